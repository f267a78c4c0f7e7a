"""The dataset check before training: ``check_dataset`` finds bad image files, boxes and ids in rows of our schema
(``schema.py``) and returns the dataset to train on, with a ``DatasetReport`` of what it found and skipped.
"""
import hashlib
import logging
import os
from dataclasses import dataclass, field

import datasets
import numpy as np

from .images import open_image
from .schema import get_categories

logger = logging.getLogger("training.data")   # one logger for the package, whichever module logs

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
