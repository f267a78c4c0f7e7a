"""Hub detection datasets (``datasets.load_dataset`` or a ``save_to_disk`` folder) -> our schema (``schema.py``).

Column and field names map through ``HUB_COLUMNS`` and ``column_mapping``; the box format is an argument, never
guessed; the categories come from the source's ``ClassLabel`` or from the caller.
"""
import logging
from pathlib import Path

import datasets
import numpy as np

from .images import image_size
from .schema import DETECTION_FEATURES, Categories, set_categories, set_split

# our name -> the source's name; the transformers detection schema (cppe-5: image + objects{id, area, bbox,
# category}). Only image, objects, bbox and category are required in the source.
HUB_COLUMNS = {"image": "image", "image_id": "image_id", "width": "width", "height": "height",
               "objects": "objects", "bbox": "bbox", "category": "category", "area": "area", "id": "id",
               "iscrowd": "iscrowd"}
BBOX_FORMATS = ("xywh", "xyxy")
logger = logging.getLogger("training.data")


# the names a validation split goes by, looked for in this order when "validation" (or "val", "valid") is asked
# for: cppe-5 and many other detection sets have only train and test
VALIDATION_SPLITS = ("validation", "val", "valid", "test")


def load_hub_detection(name_or_path: str, split: str | None = None, *, bbox_format: str, bbox_normalized: bool,
                       column_mapping: dict | None = None, categories: list | None = None, **load_kwargs):
    """A Hub detection dataset (``datasets.load_dataset(name_or_path)``, or a ``save_to_disk`` folder) in our schema.

    ``split``: the split to read (None: every split, as a ``DatasetDict``). "validation" reads the first of
    ``VALIDATION_SPLITS`` the dataset has (logged when it is not "validation"); the name read is recorded on the
    returned dataset (``get_split``). A missing split is a ValueError listing the dataset's splits.
    ``bbox_format`` ("xywh" or "xyxy") and ``bbox_normalized`` (coordinates divided by the image size) must be
    given: they are never guessed (cppe-5 is xywh absolute, detection-datasets/coco is xyxy absolute).
    ``column_mapping`` overrides entries of ``HUB_COLUMNS`` (our name -> the source's column or field name).
    Categories come from the ``category`` field's ``ClassLabel`` names (ids 0..K-1), or from ``categories``:
    a list of names (index = id) or of ``{"id", "name"}`` dicts.
    """
    saved = Path(name_or_path)
    if (saved / "dataset_dict.json").is_file() or (saved / "state.json").is_file():  # a save_to_disk folder
        dataset = datasets.load_from_disk(name_or_path)
    else:   # all splits: load_dataset prepares every split anyway, and the names are needed to choose one
        dataset = datasets.load_dataset(name_or_path, **load_kwargs)
    if split is not None and isinstance(dataset, datasets.DatasetDict):
        split = choose_split(list(dataset), split, source=name_or_path)
        dataset = dataset[split]
    elif split is not None:
        logger.warning("%s is one dataset, without splits: %r reads all of it (training and validating on the same "
                       "rows?). Save a DatasetDict with train and validation splits.", name_or_path, split)
        split = None
    dataset = normalize_hub_dataset(dataset, bbox_format=bbox_format, bbox_normalized=bbox_normalized,
                                    column_mapping=column_mapping, categories=categories,
                                    source=f"{name_or_path}" + (f" split {split!r}" if split else ""))
    return set_split(dataset, split) if split else dataset


def choose_split(splits: list[str], split: str, *, source: str) -> str:
    """The split to read among `splits`: `split` itself, or for a validation split ("validation", "val", "valid")
    the first of VALIDATION_SPLITS there is. Otherwise a ValueError naming the splits and the flags."""
    if split in splits:
        return split
    if split in VALIDATION_SPLITS[:3]:
        found = next((name for name in VALIDATION_SPLITS if name in splits), None)
        if found is not None:
            logger.info("%s has no %r split: validating on its %r split (its splits: %s; --val_split chooses)",
                        source, split, found, ", ".join(splits))
            return found
        raise ValueError(f"{source} has no validation split (looked for {', '.join(map(repr, VALIDATION_SPLITS))}):"
                         f" its splits are {splits}. Pass --val_split with one of them, or hold out part of the "
                         "training split (datasets' train_test_split) and save it as 'validation'.")
    raise ValueError(f"{source} has no split {split!r}: its splits are {splits}. Pass --train_split / --val_split "
                     "with one of them.")


def normalize_hub_dataset(dataset, *, bbox_format: str, bbox_normalized: bool, column_mapping: dict | None = None,
                          categories: list | None = None, source: str = "the dataset"):
    """Maps a Hub-schema ``Dataset`` (or ``DatasetDict``) to ``DETECTION_FEATURES``; see ``load_hub_detection``.
    Boxes that contradict the declared format (``check_box_format``) are a ValueError naming ``source``."""
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({
            name: normalize_hub_dataset(part, bbox_format=bbox_format, bbox_normalized=bbox_normalized,
                                        column_mapping=column_mapping, categories=categories,
                                        source=f"{source} split {name!r}")
            for name, part in dataset.items()})
    if bbox_format not in BBOX_FORMATS:
        raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}")
    unknown = set(column_mapping or {}) - set(HUB_COLUMNS)
    if unknown:
        raise ValueError(f"unknown keys in column_mapping: {sorted(unknown)}; known: {sorted(HUB_COLUMNS)}")
    columns = {**HUB_COLUMNS, **(column_mapping or {})}
    for ours in ("image", "objects"):
        if columns[ours] not in dataset.column_names:
            raise ValueError(f"column {columns[ours]!r} ({ours}) not in the dataset's columns {dataset.column_names}"
                             "; set column_mapping")
    object_fields = dataset.features[columns["objects"]]
    if isinstance(object_fields, (datasets.Sequence, datasets.List)):   # a list of structs, not a struct of lists
        object_fields = object_fields.feature
    for ours in ("bbox", "category"):
        if columns[ours] not in object_fields:
            raise ValueError(f"objects field {columns[ours]!r} ({ours}) not in {list(object_fields)}; "
                             "set column_mapping")
    categories = _hub_categories(object_fields[columns["category"]], categories)

    def normalize(batch, indices):
        rows = []
        for row, (image, objects) in enumerate(zip(batch[columns["image"]], batch[columns["objects"]])):
            if isinstance(objects, list):  # a List of dicts (datasets >= 4 List feature) -> dict of lists
                objects = {key: [o[key] for o in objects] for key in (objects[0] if objects else {})}
            width, height = _image_size(batch, columns, row, image)
            boxes = np.asarray(objects.get(columns["bbox"], []), dtype=np.float64).reshape(-1, 4)  # [num_objects, 4]
            if bbox_normalized:
                boxes = boxes * np.array([width, height, width, height])
            if bbox_format == "xyxy":
                boxes[:, 2:] -= boxes[:, :2]
            num_objects = len(boxes)
            ids = objects.get(columns["id"]) or [-1] * num_objects   # -1: the source gave no annotation id
            areas = objects.get(columns["area"]) or (boxes[:, 2] * boxes[:, 3]).tolist()
            rows.append({"image": image, "width": width, "height": height, "objects": {
                "id": ids, "bbox": boxes.tolist(), "category_id": list(objects.get(columns["category"], [])),
                "area": areas, "iscrowd": objects.get(columns["iscrowd"]) or [0] * num_objects}})
        out = {key: [r[key] for r in rows] for key in ("image", "width", "height", "objects")}
        out["image_id"] = batch[columns["image_id"]] if columns["image_id"] in batch else list(indices)
        return out

    # images stay encoded (bytes or path) through the map: decoding them here would be slow and pointless
    dataset = dataset.cast_column(columns["image"], datasets.Image(decode=False))
    dataset = dataset.map(normalize, batched=True, with_indices=True, remove_columns=dataset.column_names,
                          features=datasets.Features({**DETECTION_FEATURES, "image": datasets.Image(decode=False)}),
                          desc="normalizing to the detection schema")
    check_box_format(dataset, bbox_format=bbox_format, bbox_normalized=bbox_normalized, source=source)
    return set_categories(dataset.cast_column("image", datasets.Image()), categories)


BOX_FORMAT_SAMPLE = 5000   # rows whose boxes check_box_format reads: enough to see the pattern, cheap on any set


def check_box_format(dataset: datasets.Dataset, *, bbox_format: str, bbox_normalized: bool, source: str) -> None:
    """The declared box format must fit the boxes: the source's values (recovered from the normalized rows) tell
    normalized from pixel coordinates and xywh from xyxy. A wrong declaration trains on wrong boxes silently (tiny
    sub-pixel boxes, or xyxy read as xywh: boxes twice too big, many dropped as outside), so it is an error naming
    the format the data looks like."""
    sample = dataset.select_columns(["width", "height", "objects"]).select(range(min(len(dataset),
                                                                                     BOX_FORMAT_SAMPLE)))
    rows = [(w, h, box) for w, h, objects in zip(sample["width"], sample["height"], sample["objects"])
            for box in objects["bbox"]]
    if not rows:
        return
    sizes = np.array([[w, h, w, h] for w, h, _ in rows], dtype=np.float64)            # [boxes, 4]
    xywh = np.array([box for _, _, box in rows], dtype=np.float64)                     # [boxes, 4], as stored now
    finite = np.isfinite(xywh).all(1) & (sizes > 0).all(1)
    if not finite.any():
        return
    sizes, xywh = sizes[finite], xywh[finite]
    given = xywh.copy()   # the source's values, as declared
    if bbox_format == "xyxy":
        given[:, 2:] += given[:, :2]
    if bbox_normalized:
        given /= sizes
    declared = f"--bbox_format {bbox_format} --bbox_normalized {str(bbox_normalized).lower()}"
    count = f"{len(given)} boxes of the first {len(sample)} images"
    pixels = given * (1 if not bbox_normalized else sizes)
    if not bbox_normalized and given.max() <= 1.0 and sizes.max() > 4:
        raise ValueError(f"{source}: every box coordinate is in [0, 1] ({count}, images up to "
                         f"{int(sizes[:, 0].max())}x{int(sizes[:, 1].max())} pixels) but {declared} says pixels: "
                         "the boxes look normalized by the image size. Pass --bbox_normalized true "
                         "(bbox_normalized=True).")
    if bbox_normalized and given.max() > 1.5:
        raise ValueError(f"{source}: {declared} says coordinates in [0, 1], but they reach {given.max():.1f} "
                         f"({count}): the boxes look like pixels. Pass --bbox_normalized false.")
    tolerance = 1.0   # pixels, as the dataset check's box_tolerance
    width, height = sizes[:, 0], sizes[:, 1]
    a, b, c, d = pixels.T
    fits_xywh = (c > 0) & (d > 0) & (a + c <= width + tolerance) & (b + d <= height + tolerance)
    fits_xyxy = (c > a) & (d > b) & (c <= width + tolerance) & (d <= height + tolerance)
    # a few bad boxes are the dataset check's business: the pattern is "the other format fits (almost) every box"
    wrong_xywh, wrong_xyxy = int((~fits_xywh).sum()), int((~fits_xyxy).sum())
    if bbox_format == "xywh" and fits_xyxy.mean() >= 0.98 and wrong_xywh > wrong_xyxy:
        raise ValueError(f"{source}: read as xywh, {wrong_xywh} of {count} leave the image, while read as xyxy "
                         f"{int(fits_xyxy.sum())} fit with x1 > x0, y1 > y0: the boxes look like xyxy (x0, y0, x1, "
                         f"y1). Pass --bbox_format xyxy (declared: {declared}).")
    if bbox_format == "xyxy" and fits_xywh.mean() >= 0.98 and wrong_xyxy > wrong_xywh:
        raise ValueError(f"{source}: read as xyxy, {wrong_xyxy} of {count} have x1 <= x0 or y1 <= y0 or leave "
                         f"the image, while read as xywh {int(fits_xywh.sum())} fit: the boxes look like xywh (x, y, "
                         f"width, height). Pass --bbox_format xywh (declared: {declared}).")


def _hub_categories(feature, categories) -> Categories:
    """From ``categories`` (names, index = id; or ``{"id", "name"}`` dicts), else from the ``ClassLabel`` names."""
    if categories is None:
        class_label = getattr(feature, "feature", feature)
        if not isinstance(class_label, datasets.ClassLabel):
            raise ValueError("the category field is not a ClassLabel: pass categories=[names] or [{'id', 'name'}]")
        categories = class_label.names
    if all(isinstance(c, str) for c in categories):
        categories = [{"id": i, "name": name} for i, name in enumerate(categories)]
    return Categories.from_list(categories)


def _image_size(batch, columns, row, image) -> tuple[int, int]:
    """(width, height) from the source's columns when it has them, else from the image file's header."""
    if columns["width"] in batch and columns["height"] in batch:
        return int(batch[columns["width"]][row]), int(batch[columns["height"]][row])
    return image_size(image)
