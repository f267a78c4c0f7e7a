"""Detections drawn on a picture: boxes in a colour per class, each labelled with its class name and score on a
filled tab, sized from the picture (line width and font scale with the shorter side, with a legible minimum)."""
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

# tab10's colours: distinct classes stay distinct on most backgrounds
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def draw_detections(image: PIL.Image.Image, detection: dict, id2label: dict) -> PIL.Image.Image:
    """A copy of `image` (RGB) with `detection`'s boxes (xyxy pixels), class names and scores drawn on it."""
    picture = image.convert("RGB")
    draw = PIL.ImageDraw.Draw(picture)
    short_side = min(picture.size)
    line_width = max(1, round(short_side / 250))
    font = PIL.ImageFont.load_default(size=max(11, round(short_side / 40)))
    rows = sorted(zip(detection["scores"], detection["labels"], detection["boxes"]), key=lambda row: float(row[0]))
    for score, label, box in rows:   # the best last, on top
        label = int(label)
        colour = PALETTE[label % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line_width)
        text = f"{id2label.get(label, str(label))} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        width, height = right - left + 2 * line_width, bottom - top + 2 * line_width
        # the tab sits above the box, or inside it at the picture's top edge; it never leaves the picture
        tab_x = min(max(0.0, x0), max(0.0, picture.width - width))
        tab_y = y0 - height if y0 - height >= 0 else min(max(0.0, y0), max(0.0, picture.height - height))
        draw.rectangle((tab_x, tab_y, tab_x + width, tab_y + height), fill=colour)
        draw.text((tab_x + line_width - left, tab_y + line_width - top), text, fill=_text_colour(colour), font=font)
    return picture
