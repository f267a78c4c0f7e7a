"""MODEL arguments -> one `Detector`: a forward on padded batches, the processor, the class names.

MODEL is one of our folders (save_pretrained: best/, last/), a transformers DETR / RT-DETR(v2) folder or Hub id
(converted by `DetrCustomForObjectDetection.from_pretrained`), or an exported file (export.py: `.onnx` for ONNX
Runtime, `.xml` for OpenVINO), which carries its processor settings and class names in its metadata.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.image_processing_detr_custom import checked_nms_iou_threshold, suppress_duplicates

EXPORTED_SUFFIXES = (".onnx", ".xml")


@dataclass
class Detector:
    """forward(pixel_values=[B, 3, H, W], pixel_mask=[B, H, W]) -> outputs with `logits` and `pred_boxes` (torch)."""

    forward: Callable
    processor: DetrCustomImageProcessor
    id2label: dict[int, str]
    runtime: str                       # "pytorch", "onnxruntime" or "openvino"
    source: str
    num_queries: int | None = None     # the dataset check's bound on boxes per image, as in training
    model: torch.nn.Module | None = field(default=None, repr=False)   # the PyTorch model, when it is one
    # an exported file with the post-processing in its graph: forward(pixel_values, pixel_mask, target_sizes) ->
    # scores, labels, boxes (pixels), best first
    postprocessed: bool = False

    @torch.no_grad()
    def detect(self, images: list, threshold: float) -> tuple[list[dict], float]:
        """PIL images / arrays -> (post-processed detections per image, seconds in forward + post-processing).
        Each image runs without the others' padding (training/evaluation.py's detect_batch)."""
        from training.evaluation import detect_batch

        pixel_values, pixel_mask = model_inputs(self.processor, images)
        target_sizes = torch.tensor([_image_size(image) for image in images])    # [batch, 2], (h, w)
        started = time.perf_counter()
        if self.postprocessed:
            results = self._detect_postprocessed(pixel_values, pixel_mask, target_sizes, threshold)
        else:
            results = detect_batch(self.forward, self.processor, pixel_values, pixel_mask, target_sizes,
                                   threshold=threshold)
        return results, time.perf_counter() - started

    def _detect_postprocessed(self, pixel_values, pixel_mask, target_sizes, threshold: float) -> list[dict]:
        """Each image alone, cropped to its real pixels (as detect_batch), through a post-processed file."""
        from training.evaluation import unpadded_sizes

        results = []
        for index, (height, width) in enumerate(unpadded_sizes(pixel_mask)):
            out = self.forward(pixel_values[index:index + 1, :, :height, :width].contiguous(),
                               pixel_mask[index:index + 1, :height, :width].contiguous(),
                               target_sizes[index:index + 1])
            keep = out["scores"][0] > threshold
            results.append({key: out[key][0][keep] for key in ("scores", "labels", "boxes")})
        # the graph selects the top k; duplicate removal, when the processor has it, runs here (not in the graph)
        return suppress_duplicates(results, self.processor.nms_iou_threshold)


def add_nms_argument(parser) -> None:
    """--nms_iou_threshold (detr-custom-predict, detr-custom-eval): load_detector's."""
    parser.add_argument("--nms_iou_threshold", type=float,
                        help="remove duplicates: of two detections of one class overlapping by more than this IoU, "
                             "the lower-scored one (default: the model's processor setting, none unless trained "
                             "with one; 1 keeps every detection)")


def model_inputs(processor: DetrCustomImageProcessor, images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (pixel_values [B, 3, H, W], pixel_mask [B, H, W]); a processor that resizes to one fixed size and
    does not pad (RT-DETR's settings) gives no mask: every pixel is real."""
    inputs = processor(images, return_tensors="pt")
    pixel_values = inputs["pixel_values"]
    pixel_mask = inputs.get("pixel_mask")
    if pixel_mask is None:
        pixel_mask = torch.ones((pixel_values.shape[0], *pixel_values.shape[2:]), dtype=torch.long)
    return pixel_values, pixel_mask


def _image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or an [H, W, C] array."""
    if hasattr(image, "size") and not hasattr(image, "shape"):
        width, height = image.size
        return height, width
    return tuple(image.shape[:2])


def load_detector(model: str, *, threads: int | None = None, precision: str | None = None,
                  nms_iou_threshold: float | None = None) -> Detector:
    """Our folder, a transformers DETR / RT-DETR(v2) folder or Hub id, or an exported .onnx / .xml file.
    precision: an OpenVINO file's, instead of the one it was exported for (exported.PRECISIONS). nms_iou_threshold:
    instead of its processor's duplicate removal (DetrCustomImageProcessor's; 1.0 keeps every detection)."""
    detector = _load_detector(model, threads=threads, precision=precision)
    if nms_iou_threshold is not None:
        detector.processor.nms_iou_threshold = checked_nms_iou_threshold(nms_iou_threshold)
    return detector


def _load_detector(model: str, *, threads: int | None, precision: str | None) -> Detector:
    path = Path(model)
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"{model}: no such file. Give an exported file (detr-custom-export writes one) or a "
                             "model folder.")
        from .exported import load_exported

        return load_exported(path, threads=threads, precision=precision)
    if precision is not None:
        raise ValueError(f"--precision applies to an exported OpenVINO .xml file, not to {model}.")
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"{model} holds no config.json: give a folder saved by the training script (outputs/.../"
                         "best or last), a transformers DETR / RT-DETR folder, or an exported .onnx / .xml file.")
    network = DetrCustomForObjectDetection.from_pretrained(model).eval()
    processor = DetrCustomImageProcessor.from_pretrained(model)
    return Detector(forward=network.forward, processor=processor, id2label=dict(network.config.id2label),
                    runtime="pytorch", source=str(model), num_queries=network.config.num_queries, model=network)
