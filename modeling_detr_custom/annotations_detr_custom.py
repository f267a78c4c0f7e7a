"""COCO detection annotations -> DETR labels: validation with messages that name the field, then label building.

``{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id", "area", "iscrowd"}]}`` per image becomes
``class_labels``, ``boxes`` (cxcywh normalized by the visible, resized and unpadded image; docs/ARCHITECTURE.md),
``area``, ``iscrowd``, ``orig_size``, ``size``, ``image_id``, ``num_dropped_boxes`` (zero width or height after
clipping) and ``num_dropped_crowd`` (crowd boxes left out of the targets under ``drop_crowd``, not counted in the
former).
"""
import math
import numbers

import numpy as np
import torch

from .box_ops import box_xyxy_to_cxcywh


def _as_number(value, where: str, ids: str = "") -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}" + (f" ({ids})" if ids else ""))
    return float(value)


def _as_int(value, where: str, ids: str = "", allow_string: bool = False) -> int:
    """An integral id: int, numpy/torch integer, an integral float (3.0, as albumentations returns), or with
    ``allow_string`` a numeric string ("42"), as transformers' DetrImageProcessor accepts. 3.5, True, NaN: errors."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if allow_string and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and \
            float(value).is_integer():
        return int(value)
    raise ValueError(f"{where} must be an integer, got {value!r}" + (f" ({ids})" if ids else ""))


def _as_crowd_flag(value, where: str, ids: str) -> bool:
    """``iscrowd``: missing / None = 0, an integer as ``_as_int`` reads it, or a bool (python, numpy or torch), as
    transformers' DetrImageProcessor accepts."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    return bool(_as_int(value or 0, where, ids))


_EXPECTED = ('one dict per image, {"image_id": int, "annotations": [{"bbox": [x, y, width, height], '
             '"category_id": int, "area": float, "iscrowd": 0 or 1}, ...]}')


def _parse_image_annotations(target, index: int, category_id_to_label) -> dict:
    """Validate one COCO detection dict -> python lists (no tensors yet); errors name image, annotation, field."""
    where = f"annotations[{index}]"
    if isinstance(target, dict) and "annotations" not in target and "bbox" in target:
        raise ValueError(f"{where} is a single COCO object annotation (it has 'bbox'), not an image's annotations; "
                         f"expected {_EXPECTED}: wrap each image's objects as "
                         '{"image_id": ..., "annotations": [objects]}')
    if not isinstance(target, dict):
        raise ValueError(f"{where} is a {type(target).__name__}; expected {_EXPECTED}")
    if not isinstance(target.get("annotations"), (list, tuple)):
        found = "no 'annotations' key" if "annotations" not in target else \
            f"'annotations' is a {type(target['annotations']).__name__}"
        raise ValueError(f"{where} has {found} (keys: {sorted(map(str, target))}); expected {_EXPECTED}")
    if "image_id" not in target:  # transformers' DetrImageProcessor requires it too
        raise ValueError(f"{where} has no 'image_id' (keys: {sorted(map(str, target))}); expected {_EXPECTED}")
    image_id = _as_int(target["image_id"], f"{where}['image_id']", allow_string=True)
    boxes, classes, areas, crowd = [], [], [], []
    for j, obj in enumerate(target["annotations"]):
        at = f"{where}['annotations'][{j}]"
        has_id = isinstance(obj, dict) and "id" in obj
        ids = f"image_id {image_id}" + (f", annotation id {obj['id']}" if has_id else "")
        if not isinstance(obj, dict):
            raise ValueError(f"{at} ({ids}) must be a dict with 'bbox' and 'category_id', got {type(obj).__name__}")
        bbox = obj.get("bbox")
        if isinstance(bbox, (np.ndarray, torch.Tensor)):
            bbox = bbox.tolist()
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{at}['bbox'] must be 4 finite numbers [x, y, width, height], got {bbox!r} ({ids})")
        bbox = [_as_number(v, f"{at}['bbox'] value", ids) for v in bbox]
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{at}['bbox'] has a negative width or height: {bbox} ({ids}; COCO is [x, y, width, "
                             "height])")
        if "category_id" not in obj:
            raise ValueError(f"{at} ({ids}) has no 'category_id' (keys: {sorted(map(str, obj))})")
        category_id = _as_int(obj["category_id"], f"{at}['category_id']", ids)
        if category_id_to_label is not None:
            if category_id not in category_id_to_label:
                raise ValueError(f"{at}['category_id'] {category_id} is not in category_id_to_label "
                                 f"(known ids: {sorted(category_id_to_label)[:20]}; {ids})")
            category_id = category_id_to_label[category_id]
        boxes.append(bbox)
        classes.append(category_id)
        area = obj.get("area")
        areas.append(bbox[2] * bbox[3] if area is None else _as_number(area, f"{at}['area']", ids))
        crowd.append(1 if _as_crowd_flag(obj.get("iscrowd"), f"{at}['iscrowd']", ids) else 0)
    return {"image_id": image_id, "boxes": boxes, "classes": classes, "areas": areas, "iscrowd": crowd}


def parse_annotations(annotations, num_images: int, category_id_to_label) -> list[dict]:
    """One COCO detection dict (or a list, one per image) -> validated python lists per image, no tensors yet."""
    if isinstance(annotations, dict):
        annotations = [annotations]
    if not isinstance(annotations, (list, tuple)):
        raise ValueError(f"annotations is a {type(annotations).__name__}; expected {_EXPECTED}")
    if annotations and all(isinstance(a, dict) and "bbox" in a and "annotations" not in a for a in annotations):
        raise ValueError(f"annotations is a bare list of {len(annotations)} COCO object annotations (dicts with "
                         f"'bbox'); expected {_EXPECTED}. For one image pass "
                         '{"image_id": ..., "annotations": that_list}')
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
    # crowd regions are not objects to detect: dropped from training targets by default, as facebookresearch/detr
    # ConvertCocoPolysToMask and transformers' prepare_coco_detection_annotation do; COCOeval still ignores
    # detections on them, because evaluation reads the crowd boxes from the dataset, not from these labels
    crowd_dropped = nonempty & (iscrowd == 1) if drop_crowd else torch.zeros_like(nonempty)
    keep = nonempty & ~crowd_dropped
    boxes = boxes[keep]
    area = torch.tensor(parsed["areas"], dtype=torch.float32)[keep]
    if (new_h, new_w) != (orig_h, orig_w):
        ratio_h, ratio_w = new_h / orig_h, new_w / orig_w
        boxes = boxes * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=torch.float32)
        area = area * (ratio_w * ratio_h)
    if normalize_boxes:
        # normalized by the visible image, not the padded batch (docs/ARCHITECTURE.md, facebookresearch/detr#286)
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
        "num_dropped_crowd": crowd_dropped.sum(),                                     # [], other crowd boxes dropped
    }
