"""The Deformable DETR decoder (Zhu et al. 2021): post-norm layers of query self-attention, multi-scale deformable
cross-attention around each query's reference point or box, and FFN; with iterative box refinement (each layer's box
head predicts a delta in inverse-sigmoid space, and the refined box, detached, is the next layer's reference).

`decoder_type="deformable"` (`registry.py`), a multi-scale decoder: built as `cls(config)`, it takes `(query,
query_pos, reference_points, memory, spatial_shapes, ...)` and the per-layer box heads (the interface of every
multi-scale decoder, assembled by `model_deformable.py`), see `DetrCustomDeformableDecoder.forward`.
The reference points are relative to the visible (unpadded) image, our box convention; `valid_ratios` (the visible
fraction of each level's padded map) turn them into each level's padded coordinates, as in Deformable DETR.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .attention_deformable import DetrCustomDeformableAttention
from .attention_mha import DetrCustomAttention
from .blocks import inverse_sigmoid, post_norm_feed_forward
from .configuration_detr_custom import DetrCustomConfig


def refine_boxes(reference: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Boxes `sigmoid(delta + inverse_sigmoid(reference))`, cxcywh in [0, 1]. A point reference `(x, y)` refines the
    centre only; the box head's w, h logits become the box's size (Deformable DETR)."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


@dataclass
class DetrCustomDeformableDecoderOutput(ModelOutput):
    """`reference_points`: what each layer sampled around (before `valid_ratios`), the given references for layer 0
    and, with box heads, the previous layer's boxes, detached. `boxes`: each layer's boxes refined by its box head,
    with gradient to that head and the layers before it through the hidden states only (None without box heads)."""

    intermediate: torch.Tensor | None = None          # [decoder_layers, batch, queries, d_model], each layer's output
    reference_points: tuple | None = None             # per layer [batch, queries, 2 or 4]
    boxes: torch.Tensor | None = None                 # [decoder_layers, batch, queries, 4] cxcywh in [0, 1]
    hidden_states: tuple | None = None                # decoder input + each layer's output, with output_hidden_states
    cross_attentions: tuple | None = None             # per layer [batch, queries, heads, points], output_attentions


class DetrCustomDeformableDecoderLayer(GradientCheckpointingLayer):
    """Post-norm layer: self-attention between the queries (position added to queries and keys), deformable
    cross-attention from `hidden_states + query_pos` to the memory's levels, FFN (Deformable DETR's decoder layer,
    and RT-DETRv2's, whose box offsets may be scaled by another `offset_scale`)."""

    def __init__(self, config: DetrCustomConfig, num_levels: int, num_points: int | list[int] = 4,
                 offset_scale: float = 0.5):
        super().__init__()
        d_model, heads = config.d_model, config.decoder_attention_heads
        self.self_attn = DetrCustomAttention(d_model, heads, config.attention_dropout, config)
        self.cross_attn = DetrCustomDeformableAttention(d_model, heads, num_levels, num_points, offset_scale)
        self.linear1 = nn.Linear(d_model, config.decoder_ffn_dim)
        self.linear2 = nn.Linear(config.decoder_ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.activation = ACT2FN[config.activation_function]

    def forward(
        self,
        hidden_states: torch.Tensor,               # [batch, queries, d_model]
        query_pos: torch.Tensor,                   # [batch, queries, d_model]
        reference_points: torch.Tensor,            # [batch, queries, levels, 2 or 4], per level (valid ratios in)
        memory: torch.Tensor,                      # [batch, sequence, d_model], levels flattened and concatenated
        spatial_shapes,                            # [levels] of (height, width)
        memory_mask: torch.Tensor | None = None,   # [batch, sequence], True = real pixel
        self_attn_mask: torch.Tensor | None = None,   # [queries, queries] bool, True = may attend (denoising)
    ) -> tuple[torch.Tensor, torch.Tensor]:        # [batch, queries, d_model], [batch, queries, heads, points]
        query_key = hidden_states + query_pos
        attended, _ = self.self_attn(query_key, query_key, hidden_states, attn_mask=self_attn_mask)
        hidden_states = self.norm1(hidden_states + F.dropout(attended, self.dropout, self.training))
        attended, cross_weights = self.cross_attn(hidden_states + query_pos, reference_points, memory, spatial_shapes,
                                                  value_mask=memory_mask)
        hidden_states = self.norm2(hidden_states + F.dropout(attended, self.dropout, self.training))
        hidden_states = post_norm_feed_forward(self, hidden_states, self.norm3)
        return hidden_states, cross_weights


class DetrCustomDeformableDecoder(nn.Module):
    """Stack of deformable decoder layers with optional iterative box refinement (no final LayerNorm: each layer
    ends in one, as in Deformable DETR)."""

    multi_scale = True
    config_fields = ("decoder_n_points",)   # fields only this part reads (PART_FIELDS)

    def __init__(self, config: DetrCustomConfig, num_levels: int | None = None,
                 num_points: int | list[int] | None = None, offset_scale: float = 0.5):
        super().__init__()
        num_levels = config.num_feature_levels if num_levels is None else num_levels
        num_points = config.decoder_n_points if num_points is None else num_points
        self.layers = nn.ModuleList(DetrCustomDeformableDecoderLayer(config, num_levels, num_points, offset_scale)
                                    for _ in range(config.decoder_layers))

    @torch.no_grad()
    def reset_parameters(self):
        """The deformable attention's direction grid and uniform weights (Deformable DETR's init), which a generic
        Linear init undoes: the model calls this after it."""
        for layer in self.layers:
            layer.cross_attn.reset_parameters()

    def forward(
        self,
        query: torch.Tensor,                          # [batch, queries, d_model], the content part (tgt)
        query_pos: torch.Tensor | None,               # [batch, queries, d_model]; None with query_pos_head
        reference_points: torch.Tensor,               # [batch, queries, 2] (x, y) or [.., 4] cxcywh, in [0, 1]
        memory: torch.Tensor,                         # [batch, sequence, d_model]
        spatial_shapes,                               # [levels] of (height, width)
        valid_ratios: torch.Tensor | None = None,     # [batch, levels, 2] visible (w, h) fraction; None = no padding
        memory_mask: torch.Tensor | None = None,      # [batch, sequence], True = real pixel
        box_heads=None,                               # one module per layer: d_model -> 4 box-delta logits
        query_pos_head=None,                          # module: references [.., 2 or 4] -> query_pos [.., d_model]
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        self_attn_mask: torch.Tensor | None = None,   # [queries, queries] bool, True = may attend
    ) -> DetrCustomDeformableDecoderOutput:
        """With `box_heads`, each layer's refined boxes (`refine_boxes`) are the next layer's reference, detached
        (stop-gradient between layers, as Deformable DETR and RT-DETR); without, every layer uses the given
        references. With `query_pos_head`, each layer's query position is computed from the references it samples
        around (RT-DETR, DAB-DETR) instead of being `query_pos`."""
        if reference_points.shape[-1] not in (2, 4) or reference_points.shape[:2] != query.shape[:2]:
            raise ValueError(f"reference_points must be [batch, queries, 2] (x, y) or [batch, queries, 4] (cx, cy, "
                             f"w, h) = {list(query.shape[:2])} + [2 or 4], got {list(reference_points.shape)}.")
        if query_pos is None and query_pos_head is None:
            raise ValueError("pass query_pos (learned query positions) or query_pos_head (positions from the "
                             "reference boxes).")
        if box_heads is not None and len(box_heads) != len(self.layers):
            raise ValueError(f"box_heads has {len(box_heads)} heads for {len(self.layers)} layers; pass one per "
                             f"layer (or None for no refinement).")
        if valid_ratios is None:
            valid_ratios = query.new_ones(query.shape[0], self.layers[0].cross_attn.num_levels, 2)
        hidden_states = query
        intermediate, references, boxes = [], [], []
        all_states = (hidden_states,) if output_hidden_states else None
        cross_attentions = () if output_attentions else None
        for index, layer in enumerate(self.layers):
            ratios = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            level_references = reference_points[:, :, None] * ratios[:, None]   # [batch, queries, levels, 2 or 4]
            if query_pos_head is not None:
                query_pos = query_pos_head(reference_points)
            hidden_states, cross_weights = layer(hidden_states, query_pos, level_references, memory, spatial_shapes,
                                                 memory_mask, self_attn_mask)
            intermediate.append(hidden_states)
            references.append(reference_points)
            if box_heads is not None:
                boxes.append(refine_boxes(reference_points, box_heads[index](hidden_states)))
                reference_points = boxes[-1].detach()
            if output_hidden_states:
                all_states += (hidden_states,)
            if output_attentions:
                cross_attentions += (cross_weights,)
        return DetrCustomDeformableDecoderOutput(
            intermediate=torch.stack(intermediate), reference_points=tuple(references),
            boxes=torch.stack(boxes) if boxes else None, hidden_states=all_states, cross_attentions=cross_attentions)
