"""Opening undecoded ``datasets.Image`` values (``{"bytes", "path"}``) with PIL, lazily.

``PIL.Image.open`` reads only the header, so sizes and checks cost no decode; the pixels are read when asked for.
The images are never rotated by their EXIF orientation tag: COCO boxes are drawn on the pixels as stored.
"""
import io

import numpy as np
import PIL.Image

from modeling_detr_custom.image_kernels import pil_to_rgb_array

# what PIL raises for truncated and corrupt files (UnidentifiedImageError is an OSError), and our unsupported mode
DECODE_ERRORS = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)


def open_image(image: dict) -> PIL.Image.Image:
    """Opens an undecoded datasets Image value ({"bytes", "path"}) lazily: only the header is read."""
    if image.get("bytes") is not None:
        return PIL.Image.open(io.BytesIO(image["bytes"]))
    return PIL.Image.open(image["path"])


def image_size(image: dict) -> tuple[int, int]:
    """(width, height) from the image's header."""
    with open_image(image) as pil_image:
        return pil_image.size


def decode_rgb(image, where: str = "image") -> np.ndarray:
    """An undecoded datasets Image (or a PIL image) -> [height, width, 3] uint8 as the processor converts it, without
    EXIF rotation (COCO boxes are drawn on the stored pixels; the original DETR never rotates either). Raises one of
    DECODE_ERRORS for a file that cannot be decoded."""
    if isinstance(image, dict):
        image = open_image(image)
    return pil_to_rgb_array(image, exif_transpose=False, where=where)
