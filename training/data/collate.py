"""The collate function of the DataLoaders: rows of our schema (``schema.py``) -> one DETR batch (``DetrCollator``)."""
import numpy as np
import torch

from ..transforms import objects_to_target, target_to_annotations
from .images import open_image


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
