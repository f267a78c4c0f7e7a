"""Opening undecoded ``datasets.Image`` values (``{"bytes", "path"}``) with PIL, lazily.

``PIL.Image.open`` reads only the header, so sizes and checks cost no decode; the pixels are read when asked for.
An EXIF orientation tag (what phones write) is applied as the processor applies it at inference: training sees the
upright view the annotation tools show and the boxes are drawn on, and the sizes here are that view's.
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


# EXIF orientations 5..8 turn the image by 90 degrees: the upright view's width is the stored height
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def exif_orientation(pil_image: PIL.Image.Image) -> int:
    """The EXIF orientation tag (1: as stored), read from the header."""
    return int(pil_image.getexif().get(0x0112, 1) or 1)   # 0x0112 = Orientation


def upright_size(pil_image: PIL.Image.Image) -> tuple[int, int]:
    """(width, height) of the upright view: the stored size, swapped by a 90-degree EXIF orientation."""
    width, height = pil_image.size
    return (height, width) if exif_orientation(pil_image) in _TRANSPOSING_ORIENTATIONS else (width, height)


def image_size(image: dict) -> tuple[int, int]:
    """(width, height) of the upright view (EXIF orientation applied), from the image's header."""
    with open_image(image) as pil_image:
        return upright_size(pil_image)


def decode_rgb(image, where: str = "image") -> np.ndarray:
    """An undecoded datasets Image (or a PIL image) -> [height, width, 3] uint8 exactly as the processor converts it
    at inference, EXIF orientation applied. Raises one of DECODE_ERRORS for a file that cannot be decoded."""
    if isinstance(image, dict):
        image = open_image(image)
    return pil_to_rgb_array(image, exif_transpose=True, where=where)
