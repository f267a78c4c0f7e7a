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
import logging
import os
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch

from ..transforms import objects_to_target, target_to_annotations
from .coco import CACHE_VERSION, build_coco_dataset, load_coco
from .hub import BBOX_FORMATS, HUB_COLUMNS, load_hub_detection, normalize_hub_dataset
from .images import open_image
from .schema import DETECTION_FEATURES, Categories, get_categories, set_categories

logger = logging.getLogger(__name__)


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
