"""The model's entry checks on `pixel_values` and `pixel_mask`: a clear error for each bad input, before any layer
runs (a NaN image in training would otherwise reach the BatchNorm statistics of a trainable backbone first). Shared by
the DETR path (`DetrCustomModel`) and the deformable one (`model_deformable.py`).

The value checks (NaN / inf) run in eager mode only: while the forward is traced (`blocks.tracing`) they step aside,
since an exported graph takes any values.
"""
import torch
from transformers.utils import logging

from .blocks import tracing

logger = logging.get_logger(__name__)


def check_pixel_inputs(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None, num_channels: int,
                       model_dtype: torch.dtype) -> torch.Tensor:
    """Raises ValueError naming the problem and the fix; returns the mask, all ones when None."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}. Use "
                         "DetrCustomImageProcessor(images, return_tensors='pt') to build it.")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values must be [batch, {num_channels}, height, width] (config.num_channels="
            f"{num_channels}), got shape {list(pixel_values.shape)}. Use DetrCustomImageProcessor "
            "to build it from images."
        )
    batch, _, height, width = pixel_values.shape
    if batch == 0 or height == 0 or width == 0:
        raise ValueError(f"pixel_values is empty (shape {list(pixel_values.shape)}): pass at least one image.")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values has dtype {pixel_values.dtype}: the model takes normalized float images, not raw "
            "pixels. Normalize with DetrCustomImageProcessor (rescale to [0, 1], then ImageNet mean / std).")
    if pixel_values.dtype != model_dtype and not torch.is_autocast_enabled(pixel_values.device.type):
        raise ValueError(
            f"pixel_values is {pixel_values.dtype} but the model's weights are {model_dtype}: cast the inputs "
            f"(pixel_values.to({model_dtype})) or the model (model.to(...)), or run under torch.autocast.")
    # a value check: eager mode only (an exported graph takes any values)
    if not tracing() and not bool(torch.isfinite(pixel_values).all()):   # one reduction; indices only on failure
        bad = (~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"pixel_values of images {bad} (batch indices) contain NaN or inf. Check how these "
                         "images were loaded and normalized.")
    if pixel_mask is None:
        return torch.ones((batch, height, width), dtype=torch.bool, device=pixel_values.device)
    if not isinstance(pixel_mask, torch.Tensor) or tuple(pixel_mask.shape) != (batch, height, width):
        shape = list(pixel_mask.shape) if isinstance(pixel_mask, torch.Tensor) else type(pixel_mask).__name__
        raise ValueError(
            f"pixel_mask must be [batch, height, width] = {[batch, height, width]} to match pixel_values, got "
            f"{shape}. It is 1 on real pixels and 0 on padding."
        )
    if pixel_mask.is_floating_point() or pixel_mask.is_complex():
        raise ValueError(
            f"pixel_mask must be int64 or bool (1 on real pixels, 0 on padding), got {pixel_mask.dtype}. "
            "DetrCustomImageProcessor returns it as int64.")
    # a value check: eager mode only. An image with no real pixel still gets (meaningless) detections
    if not tracing() and not bool(pixel_mask.flatten(1).any(1).all()):
        empty = (~pixel_mask.flatten(1).any(1)).nonzero().flatten().tolist()
        logger.warning(f"pixel_mask of images {empty} (batch indices) is all 0 (padding): there is no image to "
                       "detect in, and their detections mean nothing. pixel_mask is 1 on real pixels; build it with "
                       "DetrCustomImageProcessor.")
    return pixel_mask
