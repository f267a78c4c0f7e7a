"""The collate function of the DataLoaders: rows of our schema (``schema.py``) -> one DETR batch (``DetrCollator``)."""
import logging

import numpy as np
import PIL.Image
import torch

from ..transforms import objects_to_target, target_to_annotations
from .images import DECODE_ERRORS, decode_rgb

logger = logging.getLogger("training.data")   # one logger for the package, whichever module logs


class DetrCollator:
    """Rows of our schema -> ``{"pixel_values", "pixel_mask", "labels"}`` through ``DetrCustomImageProcessor``.

    Each image becomes RGB first, exactly as the processor converts it (``pil_to_rgb_array``: 16-bit grayscale
    scaled, alpha on white, palette and CMYK through PIL), so a training or evaluation batch holds the same pixels
    the processor gives for the same file. With ``transforms`` (``training.transforms.make_detr_transforms``, with
    ``with_augmentations``' steps), image and boxes are then augmented and the processor does not resize again (a
    transform with a ``batch`` method, e.g. mosaic's ``BatchTransforms``, gets the whole batch at once); without,
    the processor resizes to its own ``size``. Crowd regions follow the processor's ``drop_crowd`` (default True:
    left out of the labels, counted in ``num_dropped_crowd``); evaluation reads crowd boxes from the dataset rows,
    so COCOeval still ignores them.

    Randomness: with ``seed`` and no workers, batch k of epoch e on process ``rank`` draws from
    ``np.random.default_rng([seed, rank, epoch, k])`` (see ``set_epoch``): per-process streams that do not depend
    on the global RNG. In DataLoader workers, from torch's (worker) RNG, seeded per worker and per epoch.

    Undecodable images (truncated or corrupt files met during training or evaluation) are skipped, not fatal: a
    warning names the file and image id (once per image), the example leaves the batch, and
    ``(image_id, path or None, error message)`` is appended to ``skipped`` (in DataLoader workers, to the worker's
    copy; the warning still shows). When no example of a batch decodes, the collator returns **None**: the training
    loop must skip None batches (with several processes, skip the step on every process when any got None).

    EXIF orientation: COCO boxes are drawn on the pixels as stored, and the original DETR never rotates images,
    but ``datasets.Image`` decoding applies the EXIF orientation tag (a few COCO images have one). For exact
    boxes, give rows with undecoded images, ``dataset.cast_column("image", datasets.Image(decode=False))``:
    the collate then opens the files itself without rotating them (and skips a decode in the dataset).
    A class, not a closure, so that workers can pickle it.
    """

    def __init__(self, image_processor, category_id_to_label: dict, transforms=None, seed: int | None = None,
                 rank: int = 0):
        self.image_processor = image_processor
        self.category_id_to_label = dict(category_id_to_label)
        self.transforms = transforms
        self.seed = seed
        self.rank = rank
        self.skipped: list[tuple[int, str | None, str]] = []
        self._warned: set = set()
        self.set_epoch(0)

    def set_epoch(self, epoch: int, batches_done: int = 0) -> None:
        """With a `seed`, batch k of epoch e is augmented from (seed, rank, e, k) in the main process
        (num_workers=0): the stream does not depend on the global RNG, so a run resumed mid-epoch (after
        `set_epoch(e, k)`) draws the same augmentations as a straight run."""
        self.epoch, self.batches_drawn = epoch, batches_done

    def _rng(self) -> np.random.Generator:
        if self.seed is not None and torch.utils.data.get_worker_info() is None:
            self.batches_drawn += 1
            return np.random.default_rng([self.seed, self.rank, self.epoch, self.batches_drawn - 1])
        return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))   # torch's (worker) RNG

    def _decode(self, example: dict) -> np.ndarray | None:
        """The example's pixels as stored, [height, width, 3] uint8, or None (recorded in `skipped`)."""
        image = example["image"]
        path = image.get("path") if isinstance(image, dict) else getattr(image, "filename", None) or None
        try:
            return decode_rgb(image, where=f"image_id {example['image_id']}")
        except DECODE_ERRORS as error:
            image_id = example["image_id"]
            self.skipped.append((image_id, path, f"{type(error).__name__}: {error}"))
            if image_id not in self._warned:
                self._warned.add(image_id)
                logger.warning("skipping image_id %s (%s): it cannot be decoded: %s: %s", image_id,
                               path or "embedded bytes", type(error).__name__, error)
            return None

    def __call__(self, examples: list[dict]) -> dict | None:
        rng = self._rng() if self.transforms is not None else None   # drawn even if the batch is lost: same stream
        images, targets, image_ids = [], [], []
        for example in examples:
            pixels = self._decode(example)
            if pixels is None:
                continue
            images.append(pixels)
            targets.append(objects_to_target(example["objects"]))
            image_ids.append(example["image_id"])
        if not images:
            return None
        if hasattr(self.transforms, "batch"):   # a batch-level step first (mosaic: images mix within the batch)
            pil_images, targets = self.transforms.batch([PIL.Image.fromarray(p) for p in images], targets, rng)
            images = [np.asarray(image) for image in pil_images]
        elif self.transforms is not None:
            pairs = [self.transforms(PIL.Image.fromarray(p), t, rng) for p, t in zip(images, targets)]
            images, targets = [np.asarray(image) for image, _ in pairs], [target for _, target in pairs]
        annotations = [target_to_annotations(i, target) for i, target in zip(image_ids, targets)]
        batch = self.image_processor(images, annotations=annotations, return_tensors="pt",
                                     category_id_to_label=self.category_id_to_label,
                                     do_resize=None if self.transforms is None else False)
        return {"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"], "labels": batch["labels"]}
