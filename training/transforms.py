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


# --- RT-DETR / YOLO augmentations (each off by default; `with_augmentations` adds those a config turns on) ---------
#
# Boxes leaving the image: every transform that cuts the image clips the boxes to it and drops those left with no
# area (or, for the IoU crop and mosaic, whose centre falls outside / less than `min_visible` of which remains); each
# such transform counts what it dropped in its `dropped` attribute (per process or DataLoader worker).


def vflip(image: PIL.Image.Image, target: dict) -> tuple[PIL.Image.Image, dict]:
    height = image.height
    boxes_xyxy = target["boxes_xyxy"]
    flipped = np.stack([boxes_xyxy[:, 0], height - boxes_xyxy[:, 3], boxes_xyxy[:, 2], height - boxes_xyxy[:, 1]], 1)
    return image.transpose(PIL.Image.Transpose.FLIP_TOP_BOTTOM), {**target, "boxes_xyxy": flipped.astype(np.float32)}


def rotate90(image: PIL.Image.Image, target: dict) -> tuple[PIL.Image.Image, dict]:
    """A quarter turn counter-clockwise: the pixel at (x, y) goes to (y, width - x)."""
    width = image.width
    boxes_xyxy = target["boxes_xyxy"]
    turned = np.stack([boxes_xyxy[:, 1], width - boxes_xyxy[:, 2], boxes_xyxy[:, 3], width - boxes_xyxy[:, 0]], 1)
    return image.transpose(PIL.Image.Transpose.ROTATE_90), {**target, "boxes_xyxy": turned.astype(np.float32)}


class RandomVerticalFlip:
    """Flips top-bottom with probability ``p`` (overhead and microscopy images have no 'up')."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, rng: np.random.Generator):
        return vflip(image, target) if rng.random() < self.p else (image, target)

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p})"


class RandomRotate90:
    """Turns by 0, 90, 180 or 270 degrees, each equally likely (overhead and microscopy images)."""

    def __call__(self, image, target, rng: np.random.Generator):
        for _ in range(int(rng.integers(4))):
            image, target = rotate90(image, target)
        return image, target

    def __repr__(self):
        return f"{type(self).__name__}()"


def _hue_shift(image: PIL.Image.Image, shift: float) -> PIL.Image.Image:
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(round(shift * 255))) % 256
    return PIL.Image.fromarray(hsv, "HSV").convert("RGB")


class PhotometricDistort:
    """RT-DETR's RandomPhotometricDistort (torchvision.transforms.v2's ranges): brightness x[0.875, 1.125],
    contrast x[0.5, 1.5], saturation x[0.5, 1.5], hue +-0.05 turn, each applied with probability ``p``, in a random
    order of the colour three. Boxes are unchanged."""

    def __init__(self, p: float = 0.5, brightness=(0.875, 1.125), contrast=(0.5, 1.5), saturation=(0.5, 1.5),
                 hue=(-0.05, 0.05)):
        self.p, self.brightness, self.contrast, self.saturation, self.hue = p, brightness, contrast, saturation, hue

    def __call__(self, image, target, rng: np.random.Generator):
        from PIL import ImageEnhance

        image = image.convert("RGB")
        if rng.random() < self.p:
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(*self.brightness))
        steps = [("contrast", ImageEnhance.Contrast), ("saturation", ImageEnhance.Color), ("hue", None)]
        for index in rng.permutation(len(steps)):
            name, enhancer = steps[index]
            if rng.random() < self.p:
                factor = rng.uniform(*getattr(self, name))
                image = _hue_shift(image, factor) if enhancer is None else enhancer(image).enhance(factor)
        return image, target

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p})"


class RandomZoomOut:
    """SSD / RT-DETR's zoom-out: with probability ``p``, the image is placed at a random spot of a canvas
    ``ratio`` times its size (ratio uniform in [1, max_ratio]) filled with ``fill``; boxes shift with it."""

    def __init__(self, p: float = 0.5, max_ratio: float = 4.0, fill: int = 0):
        if max_ratio < 1:
            raise ValueError(f"RandomZoomOut needs max_ratio >= 1, got {max_ratio}")
        self.p, self.max_ratio, self.fill = p, max_ratio, fill

    def __call__(self, image, target, rng: np.random.Generator):
        if rng.random() >= self.p:
            return image, target
        ratio = rng.uniform(1.0, self.max_ratio)
        width, height = int(image.width * ratio), int(image.height * ratio)
        left, top = int(rng.integers(0, width - image.width + 1)), int(rng.integers(0, height - image.height + 1))
        canvas = PIL.Image.new(image.mode, (width, height), (self.fill,) * len(image.getbands()))
        canvas.paste(image, (left, top))
        shift = np.array([left, top, left, top], dtype=np.float32)
        return canvas, {**target, "boxes_xyxy": target["boxes_xyxy"] + shift}

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p}, max_ratio={self.max_ratio}, fill={self.fill})"


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """[len(a), len(b)] IoU of x0, y0, x1, y1 boxes."""
    top_left = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    intersection = np.clip(bottom_right - top_left, 0, None).prod(-1)
    area_a = (boxes_a[:, 2:] - boxes_a[:, :2]).prod(-1)
    area_b = (boxes_b[:, 2:] - boxes_b[:, :2]).prod(-1)
    return intersection / np.maximum(area_a[:, None] + area_b[None, :] - intersection, 1e-9)


class RandomIoUCrop:
    """SSD's IoU-aware random crop (torchvision.transforms.v2.RandomIoUCrop, as RT-DETR applies it with p=0.8).

    With probability ``p``: draw a minimum IoU from ``sampler_options`` (1.0 = leave the image as it is); try up to
    ``trials`` crops of [min_scale, max_scale] of each side with aspect ratio in [0.5, 2]; accept the first that
    holds the centre of at least one box and overlaps some box by at least that IoU. Boxes whose centre leaves the
    crop are dropped (counted in ``dropped``), the others clipped to it.
    """

    def __init__(self, p: float = 0.8, min_scale: float = 0.3, max_scale: float = 1.0,
                 sampler_options=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0), trials: int = 40):
        self.p, self.min_scale, self.max_scale = p, min_scale, max_scale
        self.sampler_options, self.trials = tuple(sampler_options), trials
        self.dropped = 0

    def __call__(self, image, target, rng: np.random.Generator):
        boxes = target["boxes_xyxy"]
        if rng.random() >= self.p or len(boxes) == 0:
            return image, target
        min_iou = self.sampler_options[int(rng.integers(len(self.sampler_options)))]
        if min_iou >= 1.0:
            return image, target
        for _ in range(self.trials):
            scale_w, scale_h = rng.uniform(self.min_scale, self.max_scale, size=2)
            width, height = int(image.width * scale_w), int(image.height * scale_h)
            if width < 1 or height < 1 or not 0.5 <= width / height <= 2.0:
                continue
            left, top = int(rng.integers(0, image.width - width + 1)), int(rng.integers(0, image.height - height + 1))
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = ((centres[:, 0] > left) & (centres[:, 0] < left + width) & (centres[:, 1] > top)
                      & (centres[:, 1] < top + height))
            if not inside.any():
                continue
            region = np.array([[left, top, left + width, top + height]], dtype=np.float32)
            if box_iou(boxes[inside], region).max() < min_iou:
                continue
            kept = _select(target, inside)
            cropped_image, cropped = crop(image, kept, top, left, height, width)
            self.dropped += len(boxes) - len(cropped["boxes_xyxy"])
            return cropped_image, cropped
        return image, target

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p}, min_scale={self.min_scale})"


class ScaleJitter:
    """Scales the image (and boxes) by a factor uniform in ``[low, high]``, the longest edge capped at
    ``max_size``: a continuous jitter on top of the discrete training scales."""

    def __init__(self, low: float, high: float, max_size: int | None = None):
        if not 0 < low <= high:
            raise ValueError(f"ScaleJitter needs 0 < low <= high, got {low}, {high}")
        self.low, self.high, self.max_size = low, high, max_size

    def __call__(self, image, target, rng: np.random.Generator):
        factor = rng.uniform(self.low, self.high)
        if self.max_size is not None:
            factor = min(factor, self.max_size / max(image.width, image.height))
        return resize(image, target, max(1, int(round(min(image.width, image.height) * factor))))

    def __repr__(self):
        return f"{type(self).__name__}(low={self.low}, high={self.high}, max_size={self.max_size})"


class Mosaic:
    """YOLO's mosaic over a batch: with probability ``p`` an image becomes four, each in one quadrant around a
    random centre (in the middle half of each side) of a canvas the first image's size. Each quadrant shows the
    part of its image nearest the centre; boxes follow, clipped to the quadrant; a box left with less than
    ``min_visible`` of its area is dropped (counted in ``dropped``). Class ids, crowd flags and ids travel with
    their boxes. The three partners are drawn from the same batch (the collate sees only the batch)."""

    def __init__(self, p: float = 0.5, min_visible: float = 0.25):
        self.p, self.min_visible = p, min_visible
        self.dropped = 0

    def combine(self, images: list, targets: list, rng: np.random.Generator):
        """Four (image, target) pairs -> one."""
        width, height = images[0].width, images[0].height
        centre_x = int(rng.integers(width // 4, max(width // 4, 3 * width // 4) + 1))
        centre_y = int(rng.integers(height // 4, max(height // 4, 3 * height // 4) + 1))
        canvas = PIL.Image.new("RGB", (width, height))
        # quadrant (left, top, right, bottom) on the canvas; each image's corner nearest the centre meets it
        quadrants = [(0, 0, centre_x, centre_y), (centre_x, 0, width, centre_y), (0, centre_y, centre_x, height),
                     (centre_x, centre_y, width, height)]
        parts = []
        for index, (image, target) in enumerate(zip(images, targets)):
            q_left, q_top, q_right, q_bottom = quadrants[index]
            q_width, q_height = q_right - q_left, q_bottom - q_top
            if q_width <= 0 or q_height <= 0:
                self.dropped += len(target["boxes_xyxy"])
                continue
            # the image's own region shown: flush with the centre on both axes (PIL pads a smaller image black)
            src_left = image.width - q_width if index in (0, 2) else 0
            src_top = image.height - q_height if index in (0, 1) else 0
            visible = _keep_visible(target, self.min_visible, src_left, src_top, q_width, q_height, self)
            patch, moved = crop(image.convert("RGB"), visible, src_top, src_left, q_height, q_width)
            canvas.paste(patch, (q_left, q_top))
            offset = np.array([q_left, q_top, q_left, q_top], dtype=np.float32)
            parts.append({**moved, "boxes_xyxy": moved["boxes_xyxy"] + offset})
        merged = {name: np.concatenate([part[name] for part in parts]) for name in targets[0]}
        return canvas, merged

    def __call__(self, images: list, targets: list, rng: np.random.Generator):
        """The batch: each image replaced by a mosaic with probability p."""
        out_images, out_targets = [], []
        for index in range(len(images)):
            if rng.random() < self.p:
                partners = [index] + rng.integers(len(images), size=3).tolist()
                image, target = self.combine([images[i] for i in partners], [targets[i] for i in partners], rng)
            else:
                image, target = images[index], targets[index]
            out_images.append(image)
            out_targets.append(target)
        return out_images, out_targets

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p}, min_visible={self.min_visible})"


def _keep_visible(target: dict, min_visible: float, left: int, top: int, width: int, height: int, counter) -> dict:
    """The target without the boxes of which less than min_visible (of their area) lies in the region."""
    boxes = target["boxes_xyxy"]
    clipped = np.clip(boxes - np.array([left, top, left, top], dtype=np.float32), 0,
                      np.array([width, height, width, height], dtype=np.float32))
    visible = np.clip(clipped[:, 2] - clipped[:, 0], 0, None) * np.clip(clipped[:, 3] - clipped[:, 1], 0, None)
    full = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (visible > 0) & (visible >= min_visible * full)
    counter.dropped += int((~keep).sum())
    return _select(target, keep)


class BatchTransforms:
    """A batch-level step (``Mosaic``) before the per-image pipeline; the collate calls ``batch``. Called on one
    image, it applies the per-image pipeline only."""

    def __init__(self, mosaic: Mosaic, per_image: Compose):
        self.mosaic, self.per_image = mosaic, per_image

    def __call__(self, image, target, rng: np.random.Generator):
        return self.per_image(image, target, rng)

    def batch(self, images: list, targets: list, rng: np.random.Generator):
        images, targets = self.mosaic(images, targets, rng)
        pairs = [self.per_image(image, target, rng) for image, target in zip(images, targets)]
        return [image for image, _ in pairs], [target for _, target in pairs]

    def __repr__(self):
        return f"{type(self).__name__}({self.mosaic}, {self.per_image})"


def with_augmentations(base, *, photometric_distort: float = 0.0, zoom_out: float = 0.0, zoom_out_max: float = 4.0,
                       iou_crop: float = 0.0, scale_jitter=None, mosaic: float = 0.0, vertical_flip: bool = False,
                       rotate90: bool = False, max_size: int | None = None):
    """The training pipeline ``base`` (flip + resize, or the paper's) with the augmentations asked for, in RT-DETR's
    order: [mosaic (batch)] -> photometric -> zoom-out -> IoU crop -> vertical flip / quarter turns -> base ->
    scale jitter. Probabilities 0 (and ``scale_jitter`` None) leave a step out; all off returns ``base``."""
    steps = []
    if photometric_distort > 0:
        steps.append(PhotometricDistort(photometric_distort))
    if zoom_out > 0:
        steps.append(RandomZoomOut(zoom_out, zoom_out_max))
    if iou_crop > 0:
        steps.append(RandomIoUCrop(iou_crop))
    if vertical_flip:
        steps.append(RandomVerticalFlip())
    if rotate90:
        steps.append(RandomRotate90())
    after = []
    if scale_jitter:
        if len(scale_jitter) != 2:
            raise ValueError(f"scale_jitter needs two factors [low, high], got {list(scale_jitter)}")
        after.append(ScaleJitter(*scale_jitter, max_size=max_size))
    pipeline = Compose([*steps, base, *after]) if steps or after else base
    return BatchTransforms(Mosaic(mosaic), pipeline) if mosaic > 0 else pipeline
