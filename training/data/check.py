"""The dataset check before training: ``check_dataset`` finds bad image files, boxes and ids in rows of our schema
(``schema.py``) and returns the dataset to train on, with a ``DatasetReport`` of what it found and skipped.
"""
import hashlib
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import datasets
import numpy as np

from modeling_detr_custom.image_kernels import SUPPORTED_PIL_MODES

from .images import DECODE_ERRORS, exif_orientation, open_image, upright_size
from .schema import Categories, get_categories, get_load_problems

logger = logging.getLogger("training.data")   # one logger for the package, whichever module logs

# image-level problems drop the image under policy "skip"; box-level problems drop the box
IMAGE_PROBLEMS = ("missing_image", "unreadable_image", "unsupported_image_mode", "size_mismatch",
                  "too_many_objects")
BOX_PROBLEMS = ("non_finite_box", "box_outside_image", "non_positive_size", "unknown_category",
                "duplicate_annotation_id", "unknown_image_id")
CHECK_IMAGES = ("header", "decode", "auto")
AUTO_DECODE_MAX_IMAGES = 20_000   # check_images="auto" decodes every image of a set up to this size
_VALUE_RANGE = {"I": 65535, "F": 255}   # what pil_to_rgb_array maps to 0..255 (I as 16-bit, F as PIL converts it)


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
    image_check: str = "not run"   # what was done to the image files and what it cost: "decoded 500 images in 0.8 s"

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    def add(self, problem: str, message: str, max_examples: int):
        self.counts[problem] += 1
        if len(self.examples[problem]) < max_examples:
            self.examples[problem].append(message)

    def __str__(self):
        lines = [f"dataset check: {self.num_images} images, {self.num_boxes} boxes, policy {self.policy!r}; "
                 f"image files: {self.image_check}"]
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


def _box_problem(box, width, height, category_id, ann_id, seen_ids, known_categories, box_tolerance, where):
    box_where = f"{where}, annotation {ann_id}, bbox {[round(v, 2) for v in box]}"
    x, y, w, h = box
    if not all(math.isfinite(v) for v in box):   # NaN is how a null bbox value reaches the schema
        return "non_finite_box", f"{box_where}: every value must be a finite number (null or NaN in the source?)"
    if w <= 0 or h <= 0:
        return "non_positive_size", box_where
    if x < -box_tolerance or y < -box_tolerance or x + w > width + box_tolerance or y + h > height + box_tolerance:
        return "box_outside_image", f"{box_where} in a {width}x{height} image"
    if category_id not in known_categories:
        return "unknown_category", f"{box_where}: category_id {category_id}"
    if ann_id >= 0 and ann_id in seen_ids:
        return "duplicate_annotation_id", box_where
    return None


def check_dataset(dataset: datasets.Dataset, *, num_queries: int | None = None, policy: str = "skip",
                  check_images: str = "auto", box_tolerance: float = 1.0,
                  max_examples: int = 5, source: str = "") -> tuple[datasets.Dataset, DatasetReport]:
    """Checks a dataset in our schema before training; returns (the dataset to train on, the report).

    Finds: missing image files, files PIL cannot read (with ``check_images="decode"``, also truncated and corrupt
    pixel data), PIL modes the training path has no RGB conversion for, json width/height that disagree with the
    file, non-finite box values (null or NaN in the source), boxes that leave the image by more than
    ``box_tolerance`` pixels, boxes with zero or negative width/height, category ids not in the dataset's
    categories, duplicate annotation ids (the later occurrences), annotations whose image id is not in the
    source's images (found by the loader; never loaded), and images with more than ``num_queries`` non-crowd boxes
    left (DETR cannot predict them all).

    ``check_images``: "header" opens each file's header only; "decode" decodes every image, on a thread pool (PIL
    releases the GIL while decoding); "auto" decodes when the set has at most ``AUTO_DECODE_MAX_IMAGES`` images,
    else reads headers. ``report.image_check`` says which was done and what it cost.

    policy "skip" drops the bad images and boxes and logs the report; "error" raises ValueError with it. Either
    way, a dataset with no image or no non-crowd box left is an error: there is nothing to train on or evaluate.
    ``source`` (the file, or the dataset and split) starts the errors' messages.
    """
    if policy not in ("skip", "error"):
        raise ValueError(f"policy must be 'skip' or 'error', got {policy!r}")
    if check_images not in CHECK_IMAGES:
        raise ValueError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
    decode = check_images == "decode" or (check_images == "auto" and len(dataset) <= AUTO_DECODE_MAX_IMAGES)
    known_categories = set(get_categories(dataset).ids)
    report = DatasetReport(policy=policy, num_images=len(dataset))
    drop_images, box_keep = set(), {}   # row -> [num_objects] bool mask, only for rows that lose boxes
    seen_ids, boxes_per_row, objects_left = set(), [], {}
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    image_seconds, row = 0.0, 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="detr-check") as pool:
        for batch in raw.select_columns(["image_id", "width", "height", "objects", "image"]).iter(batch_size=1000):
            started = time.perf_counter()
            image_problems = list(pool.map(_check_image_file, batch["image"], batch["width"], batch["height"],
                                           [decode] * len(batch["image"])))
            image_seconds += time.perf_counter() - started
            for i, image_id in enumerate(batch["image_id"]):
                width, height, objects = batch["width"][i], batch["height"][i], batch["objects"][i]
                where = f"image_id {image_id}"
                if image_problems[i] is not None:
                    report.add(image_problems[i][0], f"{where}: {image_problems[i][1]}", max_examples)
                    drop_images.add(row)
                keep = np.ones(len(objects["id"]), dtype=bool)
                for k, (ann_id, box, category_id) in enumerate(zip(objects["id"], objects["bbox"],
                                                                   objects["category_id"])):
                    problem = _box_problem(box, width, height, category_id, ann_id, seen_ids, known_categories,
                                           box_tolerance, where)
                    if ann_id >= 0:
                        seen_ids.add(ann_id)
                    if problem is not None:
                        report.add(*problem, max_examples)
                        keep[k] = False
                if not keep.all():
                    box_keep[row] = keep
                objects_left[row] = int((keep & (np.asarray(objects["iscrowd"], dtype=np.int64) == 0)).sum())
                if num_queries is not None and objects_left[row] > num_queries:
                    report.add("too_many_objects", f"{where}: {objects_left[row]} boxes > num_queries {num_queries}",
                               max_examples)
                    drop_images.add(row)
                report.num_boxes += len(keep)
                boxes_per_row.append(len(keep))
                row += 1
    report.image_check = (f"{'decoded' if decode else 'read the headers of'} {len(dataset)} images in "
                          f"{image_seconds:.1f} s ({check_images!r})")
    for problem, found in get_load_problems(dataset).items():   # what the loader could not put in rows
        report.counts[problem] += found["count"]
        report.examples[problem].extend(found["examples"][:max_examples])
        report.skipped_boxes += found["count"]

    if not report.ok and policy == "error":
        raise ValueError(f"{source + ': ' if source else ''}{report}\nfix the data, or use policy='skip' to train "
                         "without these items")
    if not report.ok:
        report.skipped_images = len(drop_images)
        report.skipped_boxes += sum(int((~keep).sum()) for r, keep in box_keep.items() if r not in drop_images)
        report.skipped_boxes += sum(boxes_per_row[r] for r in drop_images)
    kept_rows = [r for r in range(len(dataset)) if r not in drop_images]
    if not kept_rows or not any(objects_left[r] for r in kept_rows):
        what = "no images" if not len(dataset) else "no image left" if not kept_rows else \
            "no box (other than crowd regions) left" if report.num_boxes else "no boxes at all"
        raise ValueError(f"{source + ': ' if source else ''}{report}\nthe dataset has {what}: there is nothing to "
                         f"train on or evaluate. Check {source or 'the annotation file and image folder'} (or the Hub "
                         "columns) this dataset was loaded from")
    if report.ok:
        return dataset, report
    dataset = _drop(dataset, drop_images, box_keep)
    logger.warning("%s", report)
    return dataset, report


# fewer training images than this are easily memorized: a DETR of tens of millions of parameters fits the demo's
# 200 synthetic images in a few hundred steps (training loss falling, validation AP flat), and COCO-style
# fine-tuning recipes (50+ epochs at the full learning rate) assume thousands
SMALL_DATASET_IMAGES = 200
SMALL_DATASET_CONFIG = "training/configs/finetune_small.yaml"


def small_dataset_warning(num_images: int) -> str | None:
    """The warning for a training set small enough to memorize, or None."""
    if num_images >= SMALL_DATASET_IMAGES:
        return None
    return (f"the training set has {num_images} images (fewer than {SMALL_DATASET_IMAGES}): small enough for the "
            "model to memorize (the training loss falls while the validation AP stays flat). Start from a pretrained "
            "detector with the recipe for small sets: --config " + SMALL_DATASET_CONFIG + " (its comments say what it "
            "changes), and watch the validation AP.")


def warn_if_small(num_images: int) -> None:
    """Logs small_dataset_warning once (the training set's check)."""
    message = small_dataset_warning(num_images)
    if message is not None:
        logger.warning("%s", message)


def _check_image_file(image: dict, width: int, height: int, decode: bool) -> tuple[str, str] | None:
    """One image file -> (problem, message) or None. Runs on the check's thread pool."""
    if image.get("bytes") is None and not (image.get("path") and os.path.isfile(image["path"])):
        return "missing_image", f"{image.get('path')} does not exist"
    name = image.get("path") or "embedded bytes"
    try:
        with open_image(image) as pil_image:
            if decode:
                pil_image.load()
            size, mode = upright_size(pil_image), pil_image.mode
            orientation, stored = exif_orientation(pil_image), pil_image.size
            extrema = pil_image.getextrema() if decode and mode in ("I", "F") else None
    except DECODE_ERRORS as e:
        return "unreadable_image", f"{name}: {type(e).__name__}: {e}"
    if mode not in SUPPORTED_PIL_MODES:
        return "unsupported_image_mode", (f"{name}: PIL mode {mode!r} has no RGB conversion in the training path "
                                          f"(supported: {', '.join(SUPPORTED_PIL_MODES)}); convert the file")
    if extrema is not None and (extrema[0] < 0 or extrema[1] > _VALUE_RANGE[mode]):
        return "unsupported_image_mode", (f"{name}: PIL mode {mode!r} with values in [{extrema[0]}, {extrema[1]}]; "
                                          f"the training path reads 0..{_VALUE_RANGE[mode]} and would clip the rest: "
                                          "rescale the file")
    if size != (width, height) and orientation != 1 and stored == (width, height):
        return "size_mismatch", (f"{name}: the dataset says {width}x{height}, the file's stored size, but its EXIF "
                                 f"orientation tag ({orientation}) turns it to {size[0]}x{size[1]}; training and "
                                 "inference read the upright view (as the processor does), where the boxes must be "
                                 "drawn: give the upright size and boxes, or remove the tag (e.g. PIL's "
                                 "ImageOps.exif_transpose and save)")
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


def check_same_categories(train: Categories, val: Categories, *, train_source: str, val_source: str) -> None:
    """The validation set's categories are the training set's (same ids, same names): a model trained on one list
    and evaluated on another reports every class under the wrong name, or fails at the first evaluation."""
    if train == val:
        return
    train_names, val_names = dict(zip(train.ids, train.names)), dict(zip(val.ids, val.names))
    differences = [f"id {i}: {train_names[i]!r} in training, {val_names[i]!r} in validation"
                   for i in train.ids if i in val_names and val_names[i] != train_names[i]]
    differences += [f"id {i} ({train_names[i]!r}) only in training" for i in train.ids if i not in val_names]
    differences += [f"id {i} ({val_names[i]!r}) only in validation" for i in val.ids if i not in train_names]
    moved = sorted(set(train.names) & set(val.names) - {n for i, n in train_names.items() if val_names.get(i) == n})
    hint = (f" The names {moved} have other ids in the two files: the validation file was renumbered or its names "
            "permuted." if moved else "")
    raise ValueError(f"the validation categories ({val_source}) differ from the training categories ({train_source}): "
                     f"{'; '.join(differences[:10])}{' ...' if len(differences) > 10 else ''}.{hint} Both files must "
                     "list the same categories with the same ids: copy the training file's 'categories' into the "
                     "validation file (and map its annotations' category_id to them).")
