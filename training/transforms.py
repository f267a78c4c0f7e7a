"""DETR's training augmentations, applied to a PIL image and its boxes together.

A target is a dict of numpy arrays, one row per object:
``boxes_xyxy`` float32 ``[num_objects, 4]`` in absolute pixels (x0, y0, x1, y1), and ``category_id``,
``area``, ``iscrowd``, ``id`` ``[num_objects]``. ``objects_to_target`` and ``target_to_annotations`` convert
from the dataset's ``objects`` column (COCO ``[x, y, w, h]`` boxes) and to the processor's COCO annotations.

Every transform is called as ``transform(image, target, rng)`` with an explicit ``numpy.random.Generator``,
so a pipeline is deterministic under a seed (the collate function draws that seed from torch's RNG, which
DataLoader workers seed per worker and per epoch). The recipe follows the paper and
facebookresearch/detr ``datasets/coco.py::make_coco_transforms``:

    train: hflip(0.5) -> one of { resize(shortest edge in scales, longest <= max_size),
                                  resize(400/500/600) -> random crop 384..600 -> resize(scales) }
    val:   resize(largest scale, longest <= max_size)
"""
import numpy as np
import PIL.Image

from modeling_detr_custom.image_processing_detr_custom import get_resize_output_size

PAPER_SCALES = tuple(range(480, 801, 32))   # 480, 512, ..., 800
PAPER_MAX_SIZE = 1333
PAPER_CROP_RESIZE_SCALES = (400, 500, 600)
PAPER_CROP_SIZE = (384, 600)


def objects_to_target(objects: dict) -> dict:
    """The dataset's ``objects`` (dict of lists, COCO ``[x, y, w, h]`` boxes) -> a target of numpy arrays."""
    boxes_xywh = np.asarray(objects["bbox"], dtype=np.float32).reshape(-1, 4)  # [num_objects, 4]
    num_objects = len(boxes_xywh)
    boxes_xyxy = np.concatenate([boxes_xywh[:, :2], boxes_xywh[:, :2] + boxes_xywh[:, 2:]], axis=1)

    def column(name, dtype, default):
        values = objects.get(name)
        return np.asarray(values if values is not None else [default] * num_objects, dtype=dtype)

    return {
        "boxes_xyxy": boxes_xyxy,
        "category_id": column("category_id", np.int64, 0),
        "area": column("area", np.float32, 0.0),
        "iscrowd": column("iscrowd", np.int64, 0),
        "id": column("id", np.int64, -1),
    }


def target_to_annotations(image_id: int, target: dict) -> dict:
    """A target -> the processor's COCO detection annotations ``{"image_id", "annotations": [...]}``."""
    boxes_xyxy = target["boxes_xyxy"]
    boxes_xywh = np.concatenate([boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]], axis=1)
    annotations = [
        {"bbox": [float(v) for v in box], "category_id": int(category_id), "area": float(area), "iscrowd": int(crowd)}
        for box, category_id, area, crowd in zip(boxes_xywh, target["category_id"], target["area"], target["iscrowd"])
    ]
    return {"image_id": int(image_id), "annotations": annotations}


def _select(target: dict, keep: np.ndarray) -> dict:
    return {name: values[keep] for name, values in target.items()}


def hflip(image: PIL.Image.Image, target: dict) -> tuple[PIL.Image.Image, dict]:
    width = image.width
    boxes_xyxy = target["boxes_xyxy"]
    # x0' = width - x1 and x1' = width - x0; y is unchanged
    flipped = np.stack([width - boxes_xyxy[:, 2], boxes_xyxy[:, 1], width - boxes_xyxy[:, 0], boxes_xyxy[:, 3]], 1)
    return image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT), {**target, "boxes_xyxy": flipped.astype(np.float32)}


def resize(image: PIL.Image.Image, target: dict, shortest_edge: int, max_size: int | None = None):
    """Resizes the shortest edge to ``shortest_edge``, the longest capped at ``max_size``; boxes and area follow.

    The size is the processor's (``get_resize_output_size``): training and evaluation resize by one rule. It equals
    facebookresearch/detr's get_size_with_aspect_ratio except where ``max_size`` caps, where the long side never
    exceeds ``max_size`` (the original's can, by a pixel or more).
    """
    size = {"shortest_edge": shortest_edge}
    if max_size is not None:
        size["longest_edge"] = max_size
    new_height, new_width = get_resize_output_size(image.height, image.width, size)
    ratio_x, ratio_y = new_width / image.width, new_height / image.height
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), PIL.Image.Resampling.BILINEAR)
    scale = np.array([ratio_x, ratio_y, ratio_x, ratio_y], dtype=np.float32)
    target = {**target, "boxes_xyxy": target["boxes_xyxy"] * scale, "area": target["area"] * (ratio_x * ratio_y)}
    return image, target


def crop(image: PIL.Image.Image, target: dict, top: int, left: int, height: int, width: int):
    """Crops the region; clips boxes to it and drops those left with no area.

    As in the original DETR, every kept box's ``area`` becomes its clipped box area.
    """
    image = image.crop((left, top, left + width, top + height))
    boxes_xyxy = target["boxes_xyxy"] - np.array([left, top, left, top], dtype=np.float32)
    boxes_xyxy = np.clip(boxes_xyxy, 0, np.array([width, height, width, height], dtype=np.float32))
    keep = (boxes_xyxy[:, 2] > boxes_xyxy[:, 0]) & (boxes_xyxy[:, 3] > boxes_xyxy[:, 1])   # [num_objects]
    area = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
    return image, _select({**target, "boxes_xyxy": boxes_xyxy, "area": area.astype(np.float32)}, keep)


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng: np.random.Generator):
        for transform in self.transforms:
            image, target = transform(image, target, rng)
        return image, target

    def __repr__(self):
        return f"{type(self).__name__}({self.transforms})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, rng: np.random.Generator):
        return hflip(image, target) if rng.random() < self.p else (image, target)

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p})"


class RandomResize:
    """Resizes the shortest edge to a size drawn from ``scales`` (the longest edge is capped at ``max_size``)."""

    def __init__(self, scales, max_size: int | None = None):
        if not scales:
            raise ValueError("RandomResize needs at least one scale")
        self.scales = tuple(int(s) for s in scales)
        self.max_size = max_size

    def __call__(self, image, target, rng: np.random.Generator):
        return resize(image, target, self.scales[rng.integers(len(self.scales))], self.max_size)

    def __repr__(self):
        return f"{type(self).__name__}(scales={self.scales}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crops a random region whose width and height are drawn in ``[min_size, min(image side, max_size)]``."""

    def __init__(self, min_size: int, max_size: int):
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop needs 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target, rng: np.random.Generator):
        # an image smaller than min_size is cropped to its full side on that axis (the original would fail)
        width = int(rng.integers(min(self.min_size, image.width), min(image.width, self.max_size) + 1))
        height = int(rng.integers(min(self.min_size, image.height), min(image.height, self.max_size) + 1))
        top = int(rng.integers(0, image.height - height + 1))
        left = int(rng.integers(0, image.width - width + 1))
        return crop(image, target, top, left, height, width)

    def __repr__(self):
        return f"{type(self).__name__}(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Applies ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first, second, p: float = 0.5):
        self.first, self.second, self.p = first, second, p

    def __call__(self, image, target, rng: np.random.Generator):
        return self.first(image, target, rng) if rng.random() < self.p else self.second(image, target, rng)

    def __repr__(self):
        return f"{type(self).__name__}({self.first}, {self.second}, p={self.p})"


def make_detr_transforms(split: str, scales=PAPER_SCALES, max_size: int | None = PAPER_MAX_SIZE,
                         crop_resize_scales=PAPER_CROP_RESIZE_SCALES, crop_size=PAPER_CROP_SIZE) -> Compose:
    """The paper's pipeline for ``split`` ("train" or "val"); every size is configurable for small images.

    For the demo's ~160 px images, e.g. ``scales=range(128, 193, 16), max_size=320,
    crop_resize_scales=(128, 160), crop_size=(96, 160)``.
    """
    scales = tuple(scales)
    if split == "train":
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(
                RandomResize(scales, max_size),
                Compose([RandomResize(crop_resize_scales), RandomSizeCrop(*crop_size),
                         RandomResize(scales, max_size)]),
            ),
        ])
    if split in ("val", "validation", "test"):
        return Compose([RandomResize([max(scales)], max_size)])
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
