"""COCO detection annotations -> DETR labels: validation with messages that name the field, then label building.

``{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id", "area", "iscrowd"}]}`` per image becomes
``class_labels``, ``boxes`` (cxcywh normalized by the visible, resized and unpadded image; DESIGN.md), ``area``,
``iscrowd``, ``orig_size``, ``size``, ``image_id`` and ``num_dropped_boxes``.
"""
import math
import numbers

import numpy as np
import torch

from .box_ops import box_xyxy_to_cxcywh


def _as_number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _parse_image_annotations(target, index: int, category_id_to_label) -> dict:
    """Validate one COCO detection dict -> python lists (no tensors yet); errors name image, annotation, field."""
    where = f"annotations[{index}]"
    if not isinstance(target, dict) or not isinstance(target.get("annotations"), (list, tuple)):
        raise ValueError(f'{where} must be a dict {{"image_id": int, "annotations": [...]}}, got {type(target)}')
    image_id = target.get("image_id", index)
    if isinstance(image_id, bool) or not isinstance(image_id, numbers.Integral):
        raise ValueError(f"{where}['image_id'] must be an int, got {image_id!r}")
    boxes, classes, areas, crowd = [], [], [], []
    for j, obj in enumerate(target["annotations"]):
        at = f"{where}['annotations'][{j}]"
        if not isinstance(obj, dict):
            raise ValueError(f"{at} must be a dict with 'bbox' and 'category_id', got {type(obj).__name__}")
        bbox = obj.get("bbox")
        if isinstance(bbox, (np.ndarray, torch.Tensor)):
            bbox = bbox.tolist()
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{at}['bbox'] must be 4 finite numbers [x, y, width, height], got {bbox!r}")
        bbox = [_as_number(v, f"{at}['bbox'] value") for v in bbox]
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{at}['bbox'] has a negative width or height: {bbox} (COCO is [x, y, width, height])")
        category_id = obj.get("category_id")
        if isinstance(category_id, (np.integer, torch.Tensor)):
            category_id = int(category_id)
        if isinstance(category_id, bool) or not isinstance(category_id, numbers.Integral):
            raise ValueError(f"{at}['category_id'] must be an int, got {category_id!r}")
        if category_id_to_label is not None:
            if category_id not in category_id_to_label:
                raise ValueError(f"{at}['category_id'] {category_id} is not in category_id_to_label "
                                 f"(known ids: {sorted(category_id_to_label)[:20]})")
            category_id = category_id_to_label[category_id]
        boxes.append(bbox)
        classes.append(category_id)
        areas.append(_as_number(obj["area"], f"{at}['area']") if "area" in obj else bbox[2] * bbox[3])
        crowd.append(1 if obj.get("iscrowd", 0) else 0)
    return {"image_id": int(image_id), "boxes": boxes, "classes": classes, "areas": areas, "iscrowd": crowd}


def parse_annotations(annotations, num_images: int, category_id_to_label) -> list[dict]:
    """One COCO detection dict (or a list, one per image) -> validated python lists per image, no tensors yet."""
    if isinstance(annotations, dict):
        annotations = [annotations]
    if len(annotations) != num_images:
        raise ValueError(f"got {len(annotations)} annotation dicts for {num_images} images; "
                         "pass exactly one per image")
    return [_parse_image_annotations(target, i, category_id_to_label) for i, target in enumerate(annotations)]


def make_labels(parsed: dict, orig_hw, new_hw, drop_crowd: bool, normalize_boxes: bool) -> dict:
    """Parsed annotations of one image -> DETR labels for the resized (visible, unpadded) image."""
    orig_h, orig_w = orig_hw
    new_h, new_w = new_hw
    boxes = torch.tensor(parsed["boxes"], dtype=torch.float32).reshape(-1, 4)   # [n, 4], xywh, original pixels
    boxes[:, 2:] += boxes[:, :2]                                                # -> xyxy
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=orig_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=orig_h)
    iscrowd = torch.tensor(parsed["iscrowd"], dtype=torch.int64)
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep = nonempty & (iscrowd == 0) if drop_crowd else nonempty
    boxes = boxes[keep]
    area = torch.tensor(parsed["areas"], dtype=torch.float32)[keep]
    if (new_h, new_w) != (orig_h, orig_w):
        ratio_h, ratio_w = new_h / orig_h, new_w / orig_w
        boxes = boxes * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=torch.float32)
        area = area * (ratio_w * ratio_h)
    if normalize_boxes:
        # normalized by the visible image, not the padded batch (DESIGN.md, facebookresearch/detr#286)
        boxes = box_xyxy_to_cxcywh(boxes) / torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float32)
    return {
        "image_id": torch.tensor([parsed["image_id"]], dtype=torch.int64),
        "class_labels": torch.tensor(parsed["classes"], dtype=torch.int64)[keep],   # [n]
        "boxes": boxes,                                                               # [n, 4]
        "area": area,                                                                 # [n]
        "iscrowd": iscrowd[keep],                                                     # [n]
        "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
        "size": torch.tensor([new_h, new_w], dtype=torch.int64),
        "num_dropped_boxes": (~nonempty).sum(),                                       # [], zero-size after clipping
    }
