"""The DETR transformer encoder: post-norm self-attention layers over the flattened feature map.

One of the interchangeable encoders chosen by `config.encoder_type` (`"detr"`, see `registry.py`), built as
`cls(config, backbone_levels)`. A single-scale encoder (`multi_scale = False`) takes `(source, position_embeddings,
key_mask, output_attentions, output_hidden_states)`, with source and positions `[batch, height * width, d_model]` and
key_mask `[batch, height * width]` (True = real cell; None = no padding), and returns `(memory, hidden_states,
attentions)`: the memory `[batch, height * width, d_model]`, then the per-layer tuples or None. With a multi-scale
decoder the assembly calls `encode_levels` instead (the interface of every encoder there, see
`DetrCustomEncoder.encode_levels`): this encoder then attends within the coarsest backbone level only (RT-DETR's
AIFI) and the other levels pass through.
"""
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention_mha import DetrCustomAttention
from .blocks import mask_if_padded, post_norm_feed_forward
from .configuration_detr_custom import DetrCustomConfig


class DetrCustomEncoderLayer(GradientCheckpointingLayer):
    """Post-norm encoder layer; positions are added to queries and keys, never to values."""

    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        d_model = config.d_model
        self.self_attn = DetrCustomAttention(d_model, config.encoder_attention_heads, config.attention_dropout, config)
        self.linear1 = nn.Linear(d_model, config.encoder_ffn_dim)
        self.linear2 = nn.Linear(config.encoder_ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.activation = ACT2FN[config.encoder_activation_function or config.activation_function]

    def forward(self, hidden_states, position_embeddings, key_mask=None, output_attentions=False):
        query_key = hidden_states + position_embeddings
        attended, weights = self.self_attn(query_key, query_key, hidden_states, key_mask, output_attentions)
        hidden_states = self.norm1(hidden_states + F.dropout(attended, self.dropout, self.training))
        hidden_states = post_norm_feed_forward(self, hidden_states, self.norm2)
        return hidden_states, weights


class DetrCustomEncoder(nn.Module):
    multi_scale = False   # runs with a single-scale decoder, and with a multi-scale one on the coarsest level
    config_fields = ()   # fields only this part reads (PART_FIELDS)

    def __init__(self, config: DetrCustomConfig, backbone_levels: int = 1):
        super().__init__()
        self.layers = nn.ModuleList(DetrCustomEncoderLayer(config) for _ in range(config.encoder_layers))
        self.encoder_level = backbone_levels - 1   # encode_levels: the coarsest backbone level (AIFI)

    def encode_levels(self, maps: list, masks: list, valid_ratios, position_embedding, output_attentions: bool,
                      output_hidden_states: bool) -> tuple[list, tuple | None, tuple | None]:
        """The multi-scale interface: `maps` per level `[batch, d_model, h, w]` (finest first, the backbone levels
        then the extra ones), `masks` per level `[batch, h, w]` (True = real), `valid_ratios` `[batch, levels, 2]`,
        `position_embedding` the model's (mask, padded) -> `[batch, h * w, d_model]`. Returns the encoded maps (same
        shapes), the hidden states and attentions (or None). Here: attention within the coarsest backbone level,
        positions the DETR sine encoding (RT-DETR's AIFI); the other levels pass through."""
        level, level_mask = maps[self.encoder_level], masks[self.encoder_level]
        key_mask = mask_if_padded(level_mask.flatten(1))                 # [batch, h * w]; None: no padding
        position = position_embedding(level_mask, key_mask is not None).to(level.dtype)   # [batch, h * w, d_model]
        encoded, states, attentions = self(level.flatten(2).transpose(1, 2), position, key_mask, output_attentions,
                                           output_hidden_states)
        maps = list(maps)
        maps[self.encoder_level] = encoded.transpose(1, 2).reshape(level.shape)
        return maps, states, attentions

    def forward(self, hidden_states, position_embeddings, key_mask, output_attentions, output_hidden_states):
        all_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, position_embeddings, key_mask, output_attentions)
            if output_hidden_states:
                all_states += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return hidden_states, all_states, all_attentions
