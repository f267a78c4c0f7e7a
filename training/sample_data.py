"""Writes the embedded demo dataset in the real COCO 2017 layout, so the demo reads it through ``load_coco``.

    root/annotations/instances_train2017.json, root/annotations/instances_val2017.json
    root/train2017/*.jpg, root/val2017/*.jpg

Synthetic, learnable on a CPU in minutes, but not trivial: five shape classes, each with its own colour
(jittered), 20-80 px, 1-4 per image with some overlap, on textured backgrounds (gradient + noise); ~8% of the
images have no object, ~4% have a crowd region (a cluster of small shapes under one ``iscrowd=1`` box).
Category ids are NOT contiguous (1, 3, 7, 12, 18), as in COCO. Deterministic from ``seed``; writing is skipped
when the folder already holds the same content.

    python -m training.sample_data --output-dir data/demo [--num-train 400 --num-val 100 --seed 0]
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

CATEGORIES = [  # id, name, colour (RGB)
    (1, "circle", (225, 45, 45)),
    (3, "square", (40, 185, 65)),
    (7, "triangle", (45, 85, 235)),
    (12, "diamond", (240, 210, 40)),
    (18, "cross", (205, 55, 205)),
]
SPLITS = {"train": ("train2017", 1), "val": ("val2017", 500_001)}   # folder, first image id
DEMO_DESCRIPTION = "detr_custom synthetic demo"   # the json's info.description starts so: the folder is the demo's
MIN_SIDE, MAX_SIDE = 144, 192      # image width/height in pixels
MIN_OBJECT, MAX_OBJECT = 20, 80    # object width/height in pixels
EMPTY_FRACTION, CROWD_FRACTION = 0.08, 0.04


def _shape_polygon(name: str, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if name == "circle":
        return [(cx + w / 2 * math.cos(t), cy + h / 2 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24, False)]
    if name == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if name == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if name == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    # cross: a plus sign whose arms are a third of the box
    ax, ay = w / 3, h / 3
    return [(x0 + ax, y0), (x1 - ax, y0), (x1 - ax, y0 + ay), (x1, y0 + ay), (x1, y1 - ay), (x1 - ax, y1 - ay),
            (x1 - ax, y1), (x0 + ax, y1), (x0 + ax, y1 - ay), (x0, y1 - ay), (x0, y0 + ay), (x0 + ax, y0 + ay)]


def _polygon_area(points) -> float:
    xs, ys = np.array(points).T
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def _overlap(a, b) -> float:
    """Intersection over the smaller box, for [x0, y0, x1, y1] boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _layout(rng: np.random.Generator, width: int, height: int) -> list[dict]:
    """The objects of one image: class index, box [x0, y0, x1, y1] in integer pixels, colour, crowd flag."""
    objects = []
    if rng.random() < EMPTY_FRACTION:
        return objects
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):   # some overlap is wanted, but no shape may hide most of another
            w, h = (int(rng.integers(MIN_OBJECT, MAX_OBJECT + 1)) for _ in range(2))
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_overlap(box, o["box"]) < 0.4 for o in objects):
                break
        else:
            continue
        label = int(rng.integers(len(CATEGORIES)))
        colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in CATEGORIES[label][2])
        objects.append({"label": label, "box": box, "colour": colour, "crowd": False, "parts": [box]})
    if rng.random() < CROWD_FRACTION:
        # a crowd: 5-8 small shapes of one class in a region, annotated by a single iscrowd=1 box
        label, side = int(rng.integers(len(CATEGORIES))), int(rng.integers(40, 61))
        x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        parts = []
        for _ in range(int(rng.integers(5, 9))):
            s = int(rng.integers(8, 13))
            px, py = x0 + int(rng.integers(0, side - s + 1)), y0 + int(rng.integers(0, side - s + 1))
            parts.append((px, py, px + s, py + s))
        box = (min(p[0] for p in parts), min(p[1] for p in parts), max(p[2] for p in parts), max(p[3] for p in parts))
        objects.append({"label": label, "box": box, "colour": CATEGORIES[label][2], "crowd": True, "parts": parts})
    return objects


def _render(rng: np.random.Generator, width: int, height: int, objects: list[dict]) -> PIL.Image.Image:
    start, end = rng.integers(70, 170, size=3), rng.integers(70, 170, size=3)   # muted background colours
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width]
    t = (xs * math.cos(angle) + ys * math.sin(angle)) / math.hypot(width, height) + 0.5       # [height, width]
    background = start + np.clip(t, 0, 1)[..., None] * (end - start)                          # [height, width, 3]
    background = background + rng.normal(0, 14, size=(height, width, 3))
    image = PIL.Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = PIL.ImageDraw.Draw(image)
    for obj in objects:
        for x0, y0, x1, y1 in obj["parts"]:
            # pixel centers inside the polygon fill [x0, x1) x [y0, y1), which is the annotated box
            draw.polygon(_shape_polygon(CATEGORIES[obj["label"]][1], x0, y0, x1 - 1, y1 - 1), fill=obj["colour"])
    return image


def make_split(split: str, num_images: int, seed: int) -> tuple[dict, list]:
    """The COCO json of a split, and per image (file_name, layout rng seed, render seed) to draw it."""
    folder, first_id = SPLITS[split]
    images, annotations, to_render = [], [], []
    annotation_id = first_id * 10
    for index in range(num_images):
        rng = np.random.default_rng([seed, first_id, index])
        width, height = (int(rng.integers(MIN_SIDE, MAX_SIDE + 1)) for _ in range(2))
        image_id, file_name = first_id + index, f"{first_id + index:012d}.jpg"
        objects = _layout(rng, width, height)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            name = CATEGORIES[obj["label"]][1]
            polygons = [_shape_polygon(name, *part) for part in obj["parts"]]
            annotations.append({
                "id": annotation_id, "image_id": image_id, "category_id": CATEGORIES[obj["label"]][0],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": int(obj["crowd"]),
                "area": round(sum(_polygon_area(p) for p in polygons), 2),
                "segmentation": [[round(v, 2) for point in p for v in point] for p in polygons],
            })
            annotation_id += 1
        to_render.append((file_name, width, height, objects, [seed, first_id, index, 1]))
    coco = {
        "info": {"description": f"{DEMO_DESCRIPTION} ({split}, seed {seed})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name, _ in CATEGORIES],
    }
    return coco, to_render


def write_sample_dataset(output_dir, num_train: int = 400, num_val: int = 100, seed: int = 0) -> bool:
    """Writes the dataset; returns False (and writes nothing) when ``output_dir`` already holds the same content."""
    root = Path(output_dir)
    for split in SPLITS:   # never over a user's own COCO folder (the demo config with another --data_dir)
        path = root / "annotations" / f"instances_{split}2017.json"
        if path.is_file() and not _is_demo(path):
            raise ValueError(f"{path} is not the demo's dataset: writing the demo data into {root} would replace it. "
                             "To train on that folder pass --write_demo_data false; for the demo, choose another "
                             "--data_dir.")
    splits = {split: make_split(split, n, seed) for split, n in (("train", num_train), ("val", num_val))}
    if all(_is_written(root, split, coco) for split, (coco, _) in splits.items()):
        return False
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, (coco, to_render) in splits.items():
        image_dir = root / SPLITS[split][0]
        image_dir.mkdir(exist_ok=True)
        for file_name, width, height, objects, render_seed in to_render:
            _render(np.random.default_rng(render_seed), width, height, objects).save(image_dir / file_name, quality=92)
        # the json last: its presence marks a complete split
        with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
            json.dump(coco, f)
    return True


def _is_demo(path: Path) -> bool:
    """Whether a COCO json was written by write_sample_dataset (any seed and size): its info says so."""
    try:
        with open(path) as f:
            info = json.load(f).get("info") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(info, dict) and str(info.get("description", "")).startswith(DEMO_DESCRIPTION)


def _is_written(root: Path, split: str, coco: dict) -> bool:
    path = root / "annotations" / f"instances_{split}2017.json"
    if not path.is_file():
        return False
    with open(path) as f:
        if json.load(f) != json.loads(json.dumps(coco)):
            return False
    image_dir = root / SPLITS[split][0]
    return all((image_dir / image["file_name"]).is_file() for image in coco["images"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_train < 0 or args.num_val < 0:
        raise ValueError("--num-train and --num-val must be >= 0")
    written = write_sample_dataset(args.output_dir, args.num_train, args.num_val, args.seed)
    print(f"{'wrote' if written else 'already up to date:'} {args.output_dir} "
          f"({args.num_train} train, {args.num_val} val images)")


if __name__ == "__main__":
    main()
