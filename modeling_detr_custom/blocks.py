"""Small building blocks shared by the variants' files: the post-norm FFN, the MLP (every box head, the query position
head), the inverse sigmoid of box refinement, the levels' flattening, the fp32 island under CPU autocast, and the one
place where the forward looks at tensor values in Python.
Each part's file imports them from here, never from a peer.

`tracing()` tells whether the forward is being captured (torch.export, the dynamo ONNX exporter, torch.compile,
torch.jit.trace); `mask_if_padded` gives the padding mask only when some cell is padding, in eager mode only. A
captured graph must serve every input, so while tracing the mask is always used (the same numbers: a mask without
padding masks nothing) and the input value checks step aside (`inputs_detr_custom.py`)."""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def tracing() -> bool:
    """True while torch.export, the dynamo ONNX exporter, torch.compile or torch.jit.trace captures the forward."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def mask_if_padded(mask: torch.Tensor) -> torch.Tensor | None:
    """`mask` (True = real cell), or None in eager mode when every cell is real: without a mask SDPA picks its
    fastest kernel and the deformable attention skips masking its values. While tracing always `mask`."""
    if tracing():
        return mask
    return None if bool(mask.all()) else mask


def post_norm_feed_forward(layer: nn.Module, hidden_states: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """The FFN block that ends every post-norm layer here (encoders and decoders, as DETR's and Deformable DETR's):
    `norm(x + dropout(linear2(dropout(activation(linear1(x))))))`, with the layer's `linear1`, `linear2`,
    `activation`, `dropout` and `activation_dropout`."""
    ffn = layer.activation(layer.linear1(hidden_states))
    ffn = layer.linear2(F.dropout(ffn, layer.activation_dropout, layer.training))
    return norm(hidden_states + F.dropout(ffn, layer.dropout, layer.training))


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps (matches Deformable DETR's util/misc.py)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """Linear layers with ReLU between them, the one MLP of every variant: DETR's box head, the deformable box heads,
    the query position head and the query selection's box head. Its parameters are `layers.<i>.weight / bias`, the
    names of transformers' DETR and RT-DETR MLPs (`checkpoint_conversion.LEGACY_KEY_RULES` renames the
    `nn.Sequential` indices of folders saved by earlier versions)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def flatten_levels(maps: list[torch.Tensor], masks: list[torch.Tensor]):
    """Concatenate the levels row-major, finest first: memory [batch, sequence, d_model], memory_mask [batch,
    sequence] (True = real) and spatial_shapes as Python ints (so shapes never need a device sync)."""
    spatial_shapes = [tuple(level.shape[-2:]) for level in maps]   # ints (symbolic while exporting)
    memory = torch.cat([level.flatten(2).transpose(1, 2) for level in maps], 1)
    memory_mask = torch.cat([mask.flatten(1) for mask in masks], 1)
    return memory, memory_mask, spatial_shapes


def fold_groups(tensor: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Group DETR's folding (`query_groups.py`): `[batch, K * Q, ...]` -> `[K * batch, Q, ...]`, group-major: rows
    g * batch .. (g + 1) * batch - 1 hold group g of every image, so the folded batch's labels are `labels * K`."""
    return tensor.unflatten(1, (num_groups, -1)).transpose(0, 1).flatten(0, 1)


@contextlib.contextmanager
def fp32_on_cpu(tensor: torch.Tensor):
    """Under CPU autocast, runs the block in fp32 (yields `tensor` as float); elsewhere changes nothing.

    On CPU, bf16 autocast pays off in the backbone's convolutions (~2x); the transformer and heads are under 15 % of
    the time, and in bf16 they moved the boxes of a random R50 by 7 px at 800x1066 (0.5 px with them in fp32)."""
    if tensor.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            yield tensor.float()
    else:
        yield tensor
