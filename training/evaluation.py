"""A detector's COCO evaluation on a validation set: the one code path of the training loop's evaluations
(train.py's `evaluate`) and of `detr-custom-eval` (deploy/evaluate.py), so the two give the same numbers.

    collated batch (DetrCollator: the processor's resize, no augmentation)
      --detect_batch-->  per image {"image_id", "scores", "labels", "boxes" (xyxy, original pixels)}, threshold 0
      --score-->         training/metrics.py (pycocotools): AP, AP50, ..., AR100, AP_per_class

What makes the number the saved folder's number, whoever batches the images:
- Each image is detected without padding from its batch's other images: the images of a batch are grouped by their
  resized size, and each group runs as its own batch cropped to that size. Padding changes a detector's outputs
  (the backbone's convolutions see the zeros past the border, the encoder's positions are normalized over the image
  but its features are not), so an image's detections would otherwise depend on which images shared its batch,
  and the loop's number would not be what `DetrCustomImageProcessor` + `post_process_object_detection` give for
  that image alone.
- The model runs in its own precision (`plain_forward`): Accelerate's mixed precision wraps `model.forward` in
  autocast, while the saved folder, loaded fresh, runs in fp32.
"""
import logging
import time

import torch
from tqdm.auto import tqdm

logger = logging.getLogger("training.evaluation")


def plain_forward(model: torch.nn.Module):
    """`model.forward` without Accelerate's mixed-precision wrapper (its autocast; the weights' average, a copy of
    the prepared model, carries it too): what a fresh `from_pretrained` of the saved folder runs."""
    return model.__dict__.get("_original_forward", model.forward)


def unpadded_sizes(pixel_mask: torch.Tensor) -> list[tuple[int, int]]:
    """(height, width) of each image's real pixels in a padded batch; pixel_mask [batch, H, W], 1 on real pixels,
    which fill the top-left corner."""
    heights = pixel_mask[:, :, 0].sum(1).tolist()   # [batch]
    widths = pixel_mask[:, 0, :].sum(1).tolist()    # [batch]
    return [(int(h), int(w)) for h, w in zip(heights, widths)]


@torch.no_grad()
def detect_batch(forward, processor, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, target_sizes,
                 *, threshold: float = 0.0) -> list[dict]:
    """Detections of each image of a padded batch, each computed without the others' padding (module docstring).

    forward(pixel_values=, pixel_mask=) -> outputs with `logits` and `pred_boxes` (a model's forward, or an exported
    file's runner); target_sizes: [batch, 2] original (height, width). Returns one dict per image, in batch order:
    scores [k], labels [k], boxes [k, 4] absolute x0, y0, x1, y1 (post_process_object_detection's, as tensors)."""
    target_sizes = torch.as_tensor(target_sizes)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(unpadded_sizes(pixel_mask)):
        groups.setdefault(size, []).append(index)
    results: list[dict | None] = [None] * len(pixel_values)
    for (height, width), indices in groups.items():
        rows = torch.tensor(indices)
        outputs = forward(pixel_values=pixel_values[rows, :, :height, :width].contiguous(),
                          pixel_mask=pixel_mask[rows, :height, :width].contiguous())
        detections = processor.post_process_object_detection(
            outputs, threshold=threshold, target_sizes=target_sizes[rows])
        for index, detection in zip(indices, detections):
            results[index] = detection
    return results


def predict_loader(forward, processor, loader, *, progress: bool = True, desc: str = "eval") -> tuple[list, dict]:
    """Every decodable image of `loader` (batches from DetrCollator; None batches skipped: the collator logged each
    file) -> (predictions in metrics.py's layout, timing). Timing: `images`, `model_seconds` (forward and
    post-processing, what ms per image reports) and `seconds` (with decoding and pre-processing)."""
    predictions, model_seconds, started = [], 0.0, time.perf_counter()
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if batch is None:
            continue
        target_sizes = torch.stack([label["orig_size"] for label in batch["labels"]])   # [batch, 2], (h, w)
        batch_started = time.perf_counter()
        results = detect_batch(forward, processor, batch["pixel_values"], batch["pixel_mask"], target_sizes)
        model_seconds += time.perf_counter() - batch_started
        for label, result in zip(batch["labels"], results):
            detections = {name: value.cpu().tolist() for name, value in result.items()}
            predictions.append({"image_id": int(label["image_id"]), **detections})
    timing = {"images": len(predictions), "model_seconds": model_seconds,
              "seconds": time.perf_counter() - started}
    return predictions, timing


def score(predictions: list[dict], dataset, categories, label_to_category_id: dict | None = None) -> dict:
    """COCO metrics of `predictions` against `dataset`'s rows (our schema), in the dataset's category ids.
    `categories`: training.data.Categories; the model's label i is category `categories.ids[i]` unless
    `label_to_category_id` says otherwise. An image the collator could not decode has no predictions: it leaves the
    ground truth too (a warning counts them)."""
    from .metrics import CocoEvaluator   # here: detecting (detr-custom-predict) needs no pycocotools or datasets

    evaluator = CocoEvaluator([{"id": i, "name": n} for i, n in zip(categories.ids, categories.names)],
                              label_to_category_id or categories.label_to_category_id)
    seen = {prediction["image_id"] for prediction in predictions}
    references = [{"image_id": row["image_id"], "objects": row["objects"]}
                  for row in dataset.select_columns(["image_id", "objects"]) if row["image_id"] in seen]
    if len(references) < len(dataset):
        logger.warning("evaluation: %d of %d validation images could not be decoded and are not evaluated (see the "
                       "collator's warnings for the files)", len(dataset) - len(references), len(dataset))
    evaluator.add(predictions, references)
    return evaluator.compute()
