"""COCO-format folders and Hub detection datasets -> one ``datasets.Dataset`` schema; collate for DETR.

Every loader returns rows with the same features (``DETECTION_FEATURES``):

    image      datasets Image, decoded lazily (rows store the file path, not the pixels)
    image_id   int64, as in the source
    width, height   int32, as declared by the source
    objects    dict of lists: id int64, bbox float32 [x, y, w, h] absolute pixels, category_id int64
               (the source's own ids, e.g. COCO's 1..90 with gaps), area float32, iscrowd int8

The categories travel with the dataset (in ``dataset.info.description``, so they survive ``map``/``select``/
``save_to_disk``): ``get_categories(dataset)`` gives ``id2label``/``label2id`` over contiguous labels 0..K-1
(sorted by category id) and the ``category_id`` <-> label mappings. Evaluation reports in the source's ids.

Cache (``load_coco``): parsing a COCO json is the slow part (full COCO train: 118k images, 860k boxes). The
first load parses it once, indexes annotations by image with one sort, builds the Arrow table column-wise
and writes it as one Arrow file under ``cache_dir/<key>`` (default ``$HF_DATASETS_CACHE/detr_custom_coco``),
where the key hashes the json's absolute path, mtime, size, the image folder and the schema version. Later
loads memory-map that file (``Dataset.from_file``) and never open the json. Editing the json changes its
mtime/size, hence the key. Rows hold image paths, never pixels (``save_to_disk`` would copy every image into
the cache, so it is not used). The folder is written under a temporary name and renamed, so concurrent
processes (``accelerate launch``) never read a half-written cache.
"""
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.table import InMemoryTable

from ..transforms import objects_to_target, target_to_annotations
from .images import image_size, open_image
from .schema import DETECTION_FEATURES, Categories, get_categories, set_categories

logger = logging.getLogger(__name__)

CACHE_VERSION = "1"


# ---------------------------------------------------------------------------------------------- COCO folders

def load_coco(root: str | os.PathLike | None = None, split: str | None = None, *,
              annotation_file: str | os.PathLike | None = None, image_dir: str | os.PathLike | None = None,
              cache_dir: str | os.PathLike | None = None, use_cache: bool = True):
    """Loads COCO-format detection data as a ``datasets.Dataset`` (see the module docstring for the schema).

    - ``load_coco(root, "train")``: the COCO 2017 layout, ``root/annotations/instances_train2017.json`` with
      images in ``root/train2017/``; ``split=None`` gives a ``DatasetDict`` with "train" and "validation".
    - ``load_coco(annotation_file=..., image_dir=...)``: any COCO-format json and its image folder.

    Images without annotations are kept (DETR learns "no object" from them).
    """
    if annotation_file is not None or image_dir is not None:
        if annotation_file is None or image_dir is None or root is not None or split is not None:
            raise ValueError("give either root (and split) or both annotation_file and image_dir, not a mix")
        return _load_coco_file(Path(annotation_file), Path(image_dir), cache_dir, use_cache)
    if root is None:
        raise ValueError("load_coco needs root (COCO 2017 layout) or annotation_file and image_dir")
    root = Path(root)
    if split is None:
        return datasets.DatasetDict({
            "train": load_coco(root, "train", cache_dir=cache_dir, use_cache=use_cache),
            "validation": load_coco(root, "val", cache_dir=cache_dir, use_cache=use_cache),
        })
    coco_split = {"validation": "val"}.get(split, split)
    if coco_split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    annotation_file = root / "annotations" / f"instances_{coco_split}2017.json"
    if not annotation_file.is_file():
        raise ValueError(f"{annotation_file} not found: expected the COCO 2017 layout under {root}")
    return _load_coco_file(annotation_file, root / f"{coco_split}2017", cache_dir, use_cache)


def _cache_key(annotation_file: Path, image_dir: Path) -> str:
    stat = annotation_file.stat()
    parts = [CACHE_VERSION, str(annotation_file.resolve()), str(stat.st_mtime_ns), str(stat.st_size),
             str(image_dir.resolve())]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _load_coco_file(annotation_file: Path, image_dir: Path, cache_dir, use_cache: bool) -> datasets.Dataset:
    if not annotation_file.is_file():
        raise ValueError(f"annotation file {annotation_file} not found")
    if not use_cache:
        return build_coco_dataset(annotation_file, image_dir)
    default_root = Path(datasets.config.HF_DATASETS_CACHE) / "detr_custom_coco"
    cache_root = Path(cache_dir) if cache_dir is not None else default_root
    target = cache_root / f"{annotation_file.stem}-{_cache_key(annotation_file, image_dir)}"
    if not (target / "categories.json").is_file():
        dataset = build_coco_dataset(annotation_file, image_dir)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        # written with pyarrow, not save_to_disk: save_to_disk would copy every image file into the cache
        table = dataset.data.table
        with pa.OSFile(str(tmp / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=10_000)
        (tmp / "categories.json").write_text(dataset.info.description)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: its copy is complete, use it
            shutil.rmtree(tmp, ignore_errors=True)
    info = datasets.DatasetInfo(features=DETECTION_FEATURES, description=(target / "categories.json").read_text())
    return datasets.Dataset.from_file(str(target / "data.arrow"), info=info)   # memory-mapped


def build_coco_dataset(annotation_file: str | os.PathLike, image_dir: str | os.PathLike) -> datasets.Dataset:
    """Parses a COCO json once and builds the Arrow table column-wise (no per-image scans). In memory."""
    with open(annotation_file) as f:
        coco = json.load(f)
    if "images" not in coco or "categories" not in coco:
        raise ValueError(f"{annotation_file} is not a COCO detection file: it needs 'images' and 'categories'")
    images, annotations = coco["images"], coco.get("annotations", [])
    categories = Categories.from_list(coco["categories"])

    try:
        image_ids = np.array([im["id"] for im in images], dtype=np.int64)                   # [num_images]
        widths = np.array([im["width"] for im in images], dtype=np.int32)
        heights = np.array([im["height"] for im in images], dtype=np.int32)
        paths = [os.path.join(os.path.abspath(image_dir), im["file_name"]) for im in images]
    except KeyError as e:
        raise ValueError(f"{annotation_file}: every image needs id, width, height and file_name (missing {e})")
    if len(np.unique(image_ids)) != len(image_ids):
        raise ValueError(f"{annotation_file}: duplicate image ids in 'images'")

    try:
        ann_image_ids = np.array([a["image_id"] for a in annotations], dtype=np.int64)      # [num_annotations]
        ann_ids = np.array([a["id"] for a in annotations], dtype=np.int64)
        boxes_xywh = np.array([a["bbox"] for a in annotations], dtype=np.float32).reshape(-1, 4)
        category_ids = np.array([a["category_id"] for a in annotations], dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"{annotation_file}: every annotation needs id, image_id, bbox, category_id (missing {e})")
    except ValueError as e:
        raise ValueError(f"{annotation_file}: every bbox must be [x, y, w, h]: {e}") from None
    # area and iscrowd are optional in COCO-format files made by other tools
    areas = np.array([a.get("area", b[2] * b[3]) for a, b in zip(annotations, boxes_xywh)], dtype=np.float32)
    iscrowd = np.array([a.get("iscrowd", 0) for a in annotations], dtype=np.int8)

    # index annotations by image once: one sort, then contiguous runs per image
    id_order = np.argsort(image_ids, kind="stable")
    position = np.searchsorted(image_ids, ann_image_ids, sorter=id_order)                  # [num_annotations]
    position = np.clip(position, 0, len(image_ids) - 1)
    image_index = id_order[position] if len(image_ids) else position
    known = (image_ids[image_index] == ann_image_ids) if len(image_ids) else np.zeros(len(annotations), bool)
    if not known.all():
        missing = np.unique(ann_image_ids[~known])
        logger.warning("%s: %d annotations refer to %d image ids absent from 'images' (e.g. %s); they are not "
                       "loaded", annotation_file, int((~known).sum()), len(missing), missing[:5].tolist())
    order = np.flatnonzero(known)[np.argsort(image_index[known], kind="stable")]            # [num_kept]
    counts = np.bincount(image_index[order], minlength=len(image_ids))                     # [num_images]
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))

    def per_image(values: pa.Array) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, values)

    boxes_flat = pa.array(boxes_xywh[order].reshape(-1), pa.float32())
    objects = pa.StructArray.from_arrays([
        per_image(pa.array(ann_ids[order])),
        per_image(pa.FixedSizeListArray.from_arrays(boxes_flat, 4)),
        per_image(pa.array(category_ids[order])),
        per_image(pa.array(areas[order])),
        per_image(pa.array(iscrowd[order])),
    ], names=["id", "bbox", "category_id", "area", "iscrowd"])
    image = pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), pa.array(paths, pa.string())],
                                       names=["bytes", "path"])
    table = pa.Table.from_arrays([image, pa.array(image_ids), pa.array(widths), pa.array(heights), objects],
                                 schema=DETECTION_FEATURES.arrow_schema)
    dataset = datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=DETECTION_FEATURES))
    return set_categories(dataset, categories)


# ---------------------------------------------------------------------------------------------- Hub datasets

# our name -> the source's name; the transformers detection schema (cppe-5: image + objects{id, area, bbox,
# category}). Only image, objects, bbox and category are required in the source.
HUB_COLUMNS = {"image": "image", "image_id": "image_id", "width": "width", "height": "height",
               "objects": "objects", "bbox": "bbox", "category": "category", "area": "area", "id": "id",
               "iscrowd": "iscrowd"}
BBOX_FORMATS = ("xywh", "xyxy")


def load_hub_detection(name_or_path: str, split: str | None = None, *, bbox_format: str, bbox_normalized: bool,
                       column_mapping: dict | None = None, categories: list | None = None, **load_kwargs):
    """A Hub detection dataset (``datasets.load_dataset(name_or_path)``, or a ``save_to_disk`` folder) in our schema.

    ``bbox_format`` ("xywh" or "xyxy") and ``bbox_normalized`` (coordinates divided by the image size) must be
    given: they are never guessed (cppe-5 is xywh absolute, detection-datasets/coco is xyxy absolute).
    ``column_mapping`` overrides entries of ``HUB_COLUMNS`` (our name -> the source's column or field name).
    Categories come from the ``category`` field's ``ClassLabel`` names (ids 0..K-1), or from ``categories``:
    a list of names (index = id) or of ``{"id", "name"}`` dicts.
    """
    saved = Path(name_or_path)
    if (saved / "dataset_dict.json").is_file() or (saved / "state.json").is_file():  # a save_to_disk folder
        dataset = datasets.load_from_disk(name_or_path)
        if split is not None and isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(name_or_path, split=split, **load_kwargs)
    return normalize_hub_dataset(dataset, bbox_format=bbox_format, bbox_normalized=bbox_normalized,
                                 column_mapping=column_mapping, categories=categories)


def normalize_hub_dataset(dataset, *, bbox_format: str, bbox_normalized: bool, column_mapping: dict | None = None,
                          categories: list | None = None):
    """Maps a Hub-schema ``Dataset`` (or ``DatasetDict``) to ``DETECTION_FEATURES``; see ``load_hub_detection``."""
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({
            name: normalize_hub_dataset(part, bbox_format=bbox_format, bbox_normalized=bbox_normalized,
                                        column_mapping=column_mapping, categories=categories)
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
    return set_categories(dataset.cast_column("image", datasets.Image()), categories)


def _hub_categories(feature, categories) -> Categories:
    if categories is not None:
        if all(isinstance(c, str) for c in categories):
            categories = [{"id": i, "name": name} for i, name in enumerate(categories)]
        return Categories.from_list(categories)
    names = getattr(feature, "feature", feature)
    if isinstance(names, datasets.ClassLabel):
        return Categories.from_list([{"id": i, "name": name} for i, name in enumerate(names.names)])
    raise ValueError("the category field is not a ClassLabel: pass categories=[names] or [{'id', 'name'}]")


def _image_size(batch, columns, row, image) -> tuple[int, int]:
    """(width, height) from the source's columns when it has them, else from the image file's header."""
    if columns["width"] in batch and columns["height"] in batch:
        return int(batch[columns["width"]][row]), int(batch[columns["height"]][row])
    return image_size(image)


# ---------------------------------------------------------------------------------------------- dataset check

# image-level problems drop the image under policy "skip"; box-level problems drop the box
IMAGE_PROBLEMS = ("missing_image", "unreadable_image", "size_mismatch", "too_many_objects")
BOX_PROBLEMS = ("box_outside_image", "non_positive_size", "unknown_category", "duplicate_annotation_id")


@dataclass
class DatasetReport:
    """What ``check_dataset`` found: counts and the first examples of each problem, and what was skipped."""

    policy: str
    num_images: int = 0
    num_boxes: int = 0
    counts: dict = field(default_factory=lambda: dict.fromkeys(IMAGE_PROBLEMS + BOX_PROBLEMS, 0))
    examples: dict = field(default_factory=lambda: {p: [] for p in IMAGE_PROBLEMS + BOX_PROBLEMS})
    skipped_images: int = 0
    skipped_boxes: int = 0

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    def add(self, problem: str, message: str, max_examples: int):
        self.counts[problem] += 1
        if len(self.examples[problem]) < max_examples:
            self.examples[problem].append(message)

    def __str__(self):
        lines = [f"dataset check: {self.num_images} images, {self.num_boxes} boxes, policy {self.policy!r}"]
        for problem, count in self.counts.items():
            if count:
                lines.append(f"  {problem}: {count}")
                lines.extend(f"    e.g. {example}" for example in self.examples[problem])
        if self.ok:
            lines.append("  no problems found")
        elif self.policy == "skip":
            lines.append(f"  skipped {self.skipped_images} images and {self.skipped_boxes} boxes "
                         "(boxes of skipped images included)")
        return "\n".join(lines)


def check_dataset(dataset: datasets.Dataset, *, num_queries: int | None = None, policy: str = "skip",
                  check_images: bool = True, decode_images: bool = False, box_tolerance: float = 1.0,
                  max_examples: int = 5) -> tuple[datasets.Dataset, DatasetReport]:
    """Checks a dataset in our schema before training; returns (the dataset to train on, the report).

    Finds: missing or unreadable image files, json width/height that disagree with the file, boxes that
    leave the image by more than ``box_tolerance`` pixels, boxes with zero or negative width/height, category
    ids not in the dataset's categories, duplicate annotation ids (the later occurrences), and images with
    more than ``num_queries`` boxes left (DETR cannot predict them all). ``check_images`` opens each image's
    header; ``decode_images`` also decodes the pixels (catches truncated files; slower).

    policy "skip" drops the bad images and boxes and logs the report; "error" raises ValueError with it.
    """
    if policy not in ("skip", "error"):
        raise ValueError(f"policy must be 'skip' or 'error', got {policy!r}")
    known_categories = set(get_categories(dataset).ids)
    report = DatasetReport(policy=policy, num_images=len(dataset))
    drop_images, box_keep = set(), {}   # row -> [num_objects] bool mask, only for rows that lose boxes
    seen_ids, boxes_per_row = set(), []
    raw = dataset.cast_column("image", datasets.Image(decode=False)) if check_images else dataset
    columns = ["image_id", "width", "height", "objects"] + (["image"] if check_images else [])
    row = 0
    for batch in raw.select_columns(columns).iter(batch_size=1000):
        for i, image_id in enumerate(batch["image_id"]):
            width, height, objects = batch["width"][i], batch["height"][i], batch["objects"][i]
            where = f"image_id {image_id}"
            if check_images:
                problem = _check_image_file(batch["image"][i], width, height, decode_images)
                if problem is not None:
                    report.add(problem[0], f"{where}: {problem[1]}", max_examples)
                    drop_images.add(row)
            keep = np.ones(len(objects["id"]), dtype=bool)
            boxes = zip(objects["id"], objects["bbox"], objects["category_id"])
            for k, (ann_id, box, category_id) in enumerate(boxes):
                x, y, w, h = box
                box_where = f"{where}, annotation {ann_id}, bbox {[round(v, 2) for v in box]}"
                if w <= 0 or h <= 0:
                    problem = ("non_positive_size", box_where)
                elif x < -box_tolerance or y < -box_tolerance or x + w > width + box_tolerance or \
                        y + h > height + box_tolerance:
                    problem = ("box_outside_image", f"{box_where} in a {width}x{height} image")
                elif category_id not in known_categories:
                    problem = ("unknown_category", f"{box_where}: category_id {category_id}")
                elif ann_id >= 0 and ann_id in seen_ids:
                    problem = ("duplicate_annotation_id", box_where)
                else:
                    problem = None
                if ann_id >= 0:
                    seen_ids.add(ann_id)
                if problem is not None:
                    report.add(*problem, max_examples)
                    keep[k] = False
            if not keep.all():
                box_keep[row] = keep
            if num_queries is not None and keep.sum() > num_queries:
                report.add("too_many_objects", f"{where}: {int(keep.sum())} boxes > num_queries {num_queries}",
                           max_examples)
                drop_images.add(row)
            report.num_boxes += len(keep)
            boxes_per_row.append(len(keep))
            row += 1

    if report.ok:
        return dataset, report
    if policy == "error":
        raise ValueError(f"{report}\nfix the data, or use policy='skip' to train without these items")
    report.skipped_images = len(drop_images)
    report.skipped_boxes = sum(int((~keep).sum()) for r, keep in box_keep.items() if r not in drop_images)
    report.skipped_boxes += sum(boxes_per_row[r] for r in drop_images)
    dataset = _drop(dataset, drop_images, box_keep)
    logger.warning("%s", report)
    return dataset, report


def _check_image_file(image: dict, width: int, height: int, decode: bool) -> tuple[str, str] | None:
    if image.get("bytes") is None and not (image.get("path") and os.path.isfile(image["path"])):
        return "missing_image", f"{image.get('path')} does not exist"
    try:
        with open_image(image) as pil_image:
            if decode:
                pil_image.load()
            size = pil_image.size
    except (OSError, SyntaxError, ValueError) as e:   # PIL raises these for corrupt and truncated files
        return "unreadable_image", f"{image.get('path') or 'embedded bytes'}: {e}"
    if size != (width, height):
        return "size_mismatch", f"the dataset says {width}x{height}, the file is {size[0]}x{size[1]}"
    return None


def _drop(dataset: datasets.Dataset, drop_images: set, box_keep: dict) -> datasets.Dataset:
    if box_keep:
        def drop_boxes(objects, index):
            keep = box_keep.get(index)
            return {"objects": objects if keep is None else {k: [v for v, m in zip(vs, keep) if m]
                                                             for k, vs in objects.items()}}
        fingerprint = hashlib.sha256(repr(sorted((r, m.tolist()) for r, m in box_keep.items())).encode())
        dataset = dataset.map(drop_boxes, input_columns="objects", with_indices=True,
                              new_fingerprint=f"{dataset._fingerprint}-{fingerprint.hexdigest()[:16]}",
                              desc="dropping boxes that failed the check")
    if drop_images:
        dataset = dataset.select([i for i in range(len(dataset)) if i not in drop_images])
    return dataset


# ---------------------------------------------------------------------------------------------- collate

class DetrCollator:
    """Rows of our schema -> ``{"pixel_values", "pixel_mask", "labels"}`` through ``DetrCustomImageProcessor``.

    With ``transforms`` (``training.transforms.make_detr_transforms``), images and boxes are augmented first and
    the processor does not resize again; without, the processor resizes to its own ``size``. Randomness comes
    from one seed drawn from torch's RNG per batch, so it follows ``torch.manual_seed`` in the main process and
    DataLoader's per-worker, per-epoch seeding in workers; with ``seed`` and no workers, from (seed, epoch, batch
    index) instead (see ``set_epoch``). A class, not a closure, so that workers can pickle it.

    EXIF orientation: COCO boxes are drawn on the pixels as stored, and the original DETR never rotates images,
    but ``datasets.Image`` decoding applies the EXIF orientation tag (a few COCO images have one). For exact
    boxes, give rows with undecoded images, ``dataset.cast_column("image", datasets.Image(decode=False))``:
    the collate then opens the files itself without rotating them (and skips a decode in the dataset).
    """

    def __init__(self, image_processor, category_id_to_label: dict, transforms=None, seed: int | None = None):
        self.image_processor = image_processor
        self.category_id_to_label = dict(category_id_to_label)
        self.transforms = transforms
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int, batches_done: int = 0) -> None:
        """With a `seed`, batch k of epoch e is augmented from the seed (seed, e, k) in the main process
        (num_workers=0): the stream does not depend on the global RNG, so a run resumed mid-epoch (after
        `set_epoch(e, k)`) draws the same augmentations as a straight run."""
        self.epoch, self.batches_drawn = epoch, batches_done

    def _rng(self) -> np.random.Generator:
        if self.seed is not None and torch.utils.data.get_worker_info() is None:
            self.batches_drawn += 1
            return np.random.default_rng([self.seed, self.epoch, self.batches_drawn - 1])
        return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))   # torch's (worker) RNG

    def __call__(self, examples: list[dict]) -> dict:
        rng = self._rng() if self.transforms is not None else None
        images, annotations = [], []
        for example in examples:
            image, target = example["image"], objects_to_target(example["objects"])
            if isinstance(image, dict):   # an undecoded datasets Image: {"bytes", "path"}
                image = open_image(image)
            if self.transforms is not None:
                image, target = self.transforms(image, target, rng)
            # pixels as stored, as an array: the processor applies EXIF orientation to PIL images, but COCO boxes
            # are drawn on the stored pixels (the original DETR never rotates either)
            images.append(np.asarray(image.convert("RGB")))
            annotations.append(target_to_annotations(example["image_id"], target))
        batch = self.image_processor(images, annotations=annotations, return_tensors="pt",
                                     category_id_to_label=self.category_id_to_label,
                                     do_resize=None if self.transforms is None else False)
        return {"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"], "labels": batch["labels"]}
