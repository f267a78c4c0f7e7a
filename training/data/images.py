"""Opening undecoded ``datasets.Image`` values (``{"bytes", "path"}``) with PIL, lazily.

``PIL.Image.open`` reads only the header, so sizes and checks cost no decode; the pixels are read when asked for.
The images are never rotated by their EXIF orientation tag: COCO boxes are drawn on the pixels as stored.
"""
import io

import PIL.Image


def open_image(image: dict) -> PIL.Image.Image:
    """Opens an undecoded datasets Image value ({"bytes", "path"}) lazily: only the header is read."""
    if image.get("bytes") is not None:
        return PIL.Image.open(io.BytesIO(image["bytes"]))
    return PIL.Image.open(image["path"])


def image_size(image: dict) -> tuple[int, int]:
    """(width, height) from the image's header."""
    with open_image(image) as pil_image:
        return pil_image.size
