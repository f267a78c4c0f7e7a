"""COCO-format folders -> a ``datasets.Dataset`` in our schema (``schema.py``), cached as one Arrow file.

Parsing a COCO json is the slow part (full COCO train: 118k images, 860k boxes). The first load parses it once,
indexes annotations by image with one sort, builds the Arrow table column-wise and writes it as one Arrow file
under ``cache_dir/<key>`` (default ``$HF_DATASETS_CACHE/detr_custom_coco``), where the key hashes the json's
absolute path, mtime, size, the image folder and the schema version. Later loads memory-map that file
(``Dataset.from_file``) and never open the json. Editing the json changes its mtime/size, hence the key. Rows
hold image paths, never pixels (``save_to_disk`` would copy every image into the cache, so it is not used). The
folder is written under a temporary name and renamed, so concurrent processes (``accelerate launch``) never read
a half-written cache.
"""
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from datasets.table import InMemoryTable

from .schema import DETECTION_FEATURES, Categories, set_categories, set_load_problems

logger = logging.getLogger("training.data")   # one logger for the package, whichever module logs

CACHE_VERSION = "1"


def load_coco(root: str | os.PathLike | None = None, split: str | None = None, *,
              annotation_file: str | os.PathLike | None = None, image_dir: str | os.PathLike | None = None,
              cache_dir: str | os.PathLike | None = None, use_cache: bool = True):
    """Loads COCO-format detection data as a ``datasets.Dataset`` in the schema of ``schema.py``.

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
    coco = _read_json(annotation_file)
    images, annotations = coco["images"], coco["annotations"]
    try:
        categories = Categories.from_list(coco["categories"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{annotation_file}: 'categories': {error}") from None
    for k, im in enumerate(images):
        image_id = im.get("id") if isinstance(im, dict) else None
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise ValueError(f"{annotation_file}: images[{k}] ({im.get('file_name') if isinstance(im, dict) else im}) "
                             f"has id {image_id!r}; image ids must be integers (as the annotations' image_id)")

    try:
        image_ids = np.array([im["id"] for im in images], dtype=np.int64)                   # [num_images]
        widths = np.array([im["width"] for im in images], dtype=np.int32)
        heights = np.array([im["height"] for im in images], dtype=np.int32)
        paths = [os.path.join(os.path.abspath(image_dir), im["file_name"]) for im in images]
    except KeyError as e:
        raise ValueError(f"{annotation_file}: every image needs id, width, height and file_name (missing {e})")
    if len(np.unique(image_ids)) != len(image_ids):
        values, counts = np.unique(image_ids, return_counts=True)
        raise ValueError(f"{annotation_file}: duplicate image ids in 'images': {values[counts > 1][:10].tolist()}")

    _check_annotation_ids(annotation_file, annotations)
    ann_image_ids = np.array([a["image_id"] for a in annotations], dtype=np.int64)          # [num_annotations]
    ann_ids = np.array([a["id"] for a in annotations], dtype=np.int64)
    boxes_xywh = _boxes(annotation_file, annotations)                                       # [num_annotations, 4]
    category_ids = np.array([a["category_id"] for a in annotations], dtype=np.int64)
    # area and iscrowd are optional in COCO-format files made by other tools
    areas = np.array([a.get("area", b[2] * b[3]) for a, b in zip(annotations, boxes_xywh)], dtype=np.float32)
    iscrowd = np.array([a.get("iscrowd") or 0 for a in annotations], dtype=np.int8)

    # index annotations by image once: one sort, then contiguous runs per image
    id_order = np.argsort(image_ids, kind="stable")
    position = np.searchsorted(image_ids, ann_image_ids, sorter=id_order)                  # [num_annotations]
    position = np.clip(position, 0, len(image_ids) - 1)
    image_index = id_order[position] if len(image_ids) else position
    known = (image_ids[image_index] == ann_image_ids) if len(image_ids) else np.zeros(len(annotations), bool)
    load_problems = {}
    if not known.all():
        missing = np.unique(ann_image_ids[~known])
        logger.warning("%s: %d annotations refer to %d image ids absent from 'images' (e.g. %s); they are not "
                       "loaded", annotation_file, int((~known).sum()), len(missing), missing[:5].tolist())
        examples = [f"{annotation_file}: annotation {int(ann_ids[k])} refers to image_id {int(ann_image_ids[k])}, "
                    "which is not in 'images' (not loaded)" for k in np.flatnonzero(~known)[:5]]
        load_problems["unknown_image_id"] = {"count": int((~known).sum()), "examples": examples}
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
    return set_load_problems(set_categories(dataset, categories), load_problems)


_COCO_KEYS = ("images", "annotations", "categories")


def _read_json(annotation_file) -> dict:
    """The COCO json, with errors that name the file: invalid or truncated JSON (line and column), missing keys."""
    try:
        with open(annotation_file) as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        ends = e.pos >= len(e.doc.rstrip()) or e.msg.startswith("Unterminated string")
        truncated = "; the file ends before the JSON does: truncated (an interrupted download or copy)?" \
            if ends else ""
        raise ValueError(f"{annotation_file} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
                         f"{truncated}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{annotation_file} is not a UTF-8 text file (JSON): {e}") from None
    if not isinstance(coco, dict):
        raise ValueError(f"{annotation_file} holds a JSON {type(coco).__name__}; a COCO detection file is an object "
                         f"with keys {list(_COCO_KEYS)}")
    missing = [key for key in _COCO_KEYS if key not in coco]
    if missing:
        raise ValueError(f"{annotation_file} is not a COCO detection file: it lacks {missing} (it has "
                         f"{sorted(coco)[:10]}); it needs {list(_COCO_KEYS)}, each a list (an empty list is fine)")
    for key in _COCO_KEYS:
        if not isinstance(coco[key], list):
            raise ValueError(f"{annotation_file}: {key!r} must be a list, got a {type(coco[key]).__name__}")
    return coco


def _check_annotation_ids(annotation_file, annotations) -> None:
    """Every annotation is an object with integer id, image_id and category_id (and a bbox, see ``_boxes``)."""
    for k, a in enumerate(annotations):
        if not isinstance(a, dict):
            raise ValueError(f"{annotation_file}: annotations[{k}] is a {type(a).__name__}, not an object")
        missing = [key for key in ("id", "image_id", "bbox", "category_id") if key not in a]
        if missing:
            raise ValueError(f"{annotation_file}: annotations[{k}] (id {a.get('id')}, image_id {a.get('image_id')}) "
                             f"lacks {missing}; every annotation needs id, image_id, bbox and category_id")
        for key in ("id", "image_id", "category_id"):
            integral = isinstance(a[key], int) or isinstance(a[key], float) and a[key].is_integer()
            if isinstance(a[key], bool) or not integral:
                raise ValueError(f"{annotation_file}: annotations[{k}] (id {a.get('id')}, image_id "
                                 f"{a.get('image_id')}) has {key} {a[key]!r}; it must be an integer")


def _boxes(annotation_file, annotations) -> np.ndarray:
    """[num_annotations, 4] float32 xywh. null values become NaN, which ``check_dataset`` reports (non_finite_box)
    with the image and annotation id; a bbox that is not a list of 4 numbers cannot be stored, so it is an error."""
    bad = []
    for a in annotations:
        box = a["bbox"]
        if not isinstance(box, list) or len(box) != 4 or \
                not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in box):
            bad.append(a)
    if bad:
        examples = "; ".join(f"annotation {a.get('id')} (image_id {a.get('image_id')}): bbox {a['bbox']!r}"
                             for a in bad[:5])
        raise ValueError(f"{annotation_file}: {len(bad)} annotations have a bbox that is not 4 numbers "
                         f"[x, y, width, height]: {examples}")
    boxes = [[np.nan if v is None else v for v in a["bbox"]] for a in annotations]
    return np.array(boxes, dtype=np.float32).reshape(-1, 4)
