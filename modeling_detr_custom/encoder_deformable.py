"""The Deformable DETR encoder (Zhu et al. 2021, section 4.1): post-norm layers of multi-scale deformable
self-attention over every feature level at once, then FFN (`config.encoder_type="deformable"`, deformable decoder
only).

Where the other encoders of the deformable variant attend within the coarsest level only (AIFI) and pass the finer
levels through (or fuse them by convolutions, `encoder_hybrid.py`), here every position of every level is a query:
it samples `encoder_n_points` points around its own cell centre on each level (`DetrCustomDeformableAttention` with
point references), so the finer levels are encoded too, at a cost linear in the number of positions. The queries'
positions are each level's sine encoding plus a learned level embedding (`DetrCustomDeformableLevelEncoder`, the
registered `encoder_type="deformable"`, holds them as `level_embed` and adds them in `encode_levels`).

An encoder layer takes the flattened levels `[batch, sequence, d_model]` (finest first, row-major), their positions,
the levels' shapes, their valid ratios and the mask (True = real pixel; None = no padding). The reference points are
each cell's centre relative to its level's visible region, times each level's valid ratio (as Deformable DETR's
`get_reference_points`); tests/test_encoder_deformable.py checks the layers against transformers'
`DeformableDetrEncoder` with the same weights, with padding and uneven levels.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention_deformable import DetrCustomDeformableAttention
from .blocks import flatten_levels, mask_if_padded, post_norm_feed_forward
from .configuration_detr_custom import DetrCustomConfig


def encoder_reference_points(spatial_shapes, valid_ratios: torch.Tensor) -> torch.Tensor:
    """Every position's own cell centre as its reference point on every level: `[batch, sequence, levels, 2]` (x, y),
    the centre relative to its level's visible region, times each level's valid ratio. `spatial_shapes`: [levels] of
    (height, width); `valid_ratios`: [batch, levels, 2] visible (width, height) fraction."""
    centres = []
    for level, (height, width) in enumerate(spatial_shapes):
        rows, cols = torch.meshgrid(torch.arange(height, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                                    torch.arange(width, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                                    indexing="ij")
        visible = valid_ratios[:, None, level] * valid_ratios.new_tensor([width, height])   # [batch, 1, 2] cells
        centres.append(torch.stack([cols.flatten(), rows.flatten()], -1)[None] / visible)  # [batch, h * w, 2]
    return torch.cat(centres, 1)[:, :, None] * valid_ratios[:, None]                      # [batch, seq, levels, 2]


class DetrCustomDeformableEncoderLayer(GradientCheckpointingLayer):
    """Post-norm layer: deformable self-attention from `hidden_states + position` around each position's own cell
    on every level, then FFN (Deformable DETR's encoder layer; its names)."""

    def __init__(self, config: DetrCustomConfig, num_levels: int):
        super().__init__()
        d_model = config.d_model
        self.self_attn = DetrCustomDeformableAttention(d_model, config.encoder_attention_heads, num_levels,
                                                       config.encoder_n_points)
        self.linear1 = nn.Linear(d_model, config.encoder_ffn_dim)
        self.linear2 = nn.Linear(config.encoder_ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.activation = ACT2FN[config.encoder_activation_function or config.activation_function]

    def forward(
        self,
        hidden_states: torch.Tensor,               # [batch, sequence, d_model]
        position_embeddings: torch.Tensor,         # [batch, sequence, d_model], level embeddings included
        reference_points: torch.Tensor,            # [batch, sequence, levels, 2], `encoder_reference_points`
        spatial_shapes,                            # [levels] of (height, width)
        memory_mask: torch.Tensor | None = None,   # [batch, sequence], True = real pixel; None = no padding
    ) -> tuple[torch.Tensor, torch.Tensor]:        # [batch, sequence, d_model], [batch, sequence, heads, points]
        attended, weights = self.self_attn(hidden_states + position_embeddings, reference_points, hidden_states,
                                           spatial_shapes, value_mask=memory_mask)
        hidden_states = self.norm1(hidden_states + F.dropout(attended, self.dropout, self.training))
        hidden_states = post_norm_feed_forward(self, hidden_states, self.norm2)
        return hidden_states, weights


class DetrCustomDeformableEncoder(nn.Module):
    """`config.encoder_layers` deformable encoder layers over the flattened levels (no final LayerNorm: each layer
    ends in one), transformers' `DeformableDetrEncoder`."""

    def __init__(self, config: DetrCustomConfig, num_levels: int):
        super().__init__()
        self.layers = nn.ModuleList(DetrCustomDeformableEncoderLayer(config, num_levels)
                                    for _ in range(config.encoder_layers))

    def forward(
        self,
        hidden_states: torch.Tensor,               # [batch, sequence, d_model], the levels flattened, finest first
        position_embeddings: torch.Tensor,         # [batch, sequence, d_model]
        spatial_shapes,                            # [levels] of (height, width)
        valid_ratios: torch.Tensor,                # [batch, levels, 2] visible (width, height) fraction
        memory_mask: torch.Tensor | None = None,   # [batch, sequence], True = real pixel; None = no padding
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """Returns the memory `[batch, sequence, d_model]`, the input and every layer's output (with
        `output_hidden_states`) and every layer's attention weights `[batch, sequence, heads, levels * points]`
        (with `output_attentions`)."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios.to(hidden_states.dtype))
        all_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, position_embeddings, reference_points, spatial_shapes,
                                           memory_mask)
            if output_hidden_states:
                all_states += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return hidden_states, all_states, all_attentions


class DetrCustomDeformableLevelEncoder(DetrCustomDeformableEncoder):
    """`encoder_type="deformable"`: the layers over every level, with the learned level embeddings that Deformable
    DETR adds to each level's positions (`encode_levels`, the interface of
    `encoder_detr.DetrCustomEncoder.encode_levels`)."""

    multi_scale = True
    config_fields = ("encoder_n_points",)   # fields only this part reads (PART_FIELDS)

    def __init__(self, config: DetrCustomConfig, backbone_levels: int = 1):
        super().__init__(config, config.num_feature_levels)
        self.level_embed = nn.Parameter(torch.empty(config.num_feature_levels, config.d_model))   # reset: N(0, 1)

    @torch.no_grad()
    def reset_parameters(self):
        """Deformable DETR's init of its encoder's attention and of the level embeddings."""
        for layer in self.layers:
            layer.self_attn.reset_parameters()
        init.normal_(self.level_embed)

    def encode_levels(self, maps: list, masks: list, valid_ratios: torch.Tensor, position_embedding,
                      output_attentions: bool, output_hidden_states: bool) -> tuple[list, tuple | None, tuple | None]:
        memory, memory_mask, spatial_shapes = flatten_levels(maps, masks)
        value_mask = mask_if_padded(memory_mask)                 # None without padding (eager mode)
        position = torch.cat([position_embedding(mask, value_mask is not None) + self.level_embed[level]
                              for level, mask in enumerate(masks)], 1).to(memory.dtype)   # [batch, sequence, d]
        memory, states, attentions = self(memory, position, spatial_shapes, valid_ratios, value_mask,
                                          output_attentions, output_hidden_states)
        parts = memory.split([level.shape[-2] * level.shape[-1] for level in maps], 1)   # per level [b, h * w, d]
        return [part.transpose(1, 2).reshape(level.shape) for part, level in zip(parts, maps)], states, attentions
