"""The DETR transformer decoder: post-norm layers of query self-attention, cross-attention to the encoder's memory
and FFN, starting from zeros, with the learned object queries as `query_pos`.

One of the interchangeable decoders chosen by `config.decoder_type` (`"detr"`, see `registry.py`), built as
`cls(config)`. A single-scale decoder (`multi_scale = False`: the model puts one class and one box head on its
outputs) takes `(query_pos, memory, memory_pos, memory_mask, output_attentions,
output_hidden_states)`, with query_pos `[batch, num_queries, d_model]`, memory and memory_pos
`[batch, height * width, d_model]` and memory_mask `[batch, height * width]` (True = real cell; None = no padding),
optionally self_attn_mask `[num_queries, num_queries]` bool (True = may attend; the query groups' block-diagonal
mask in training, see `query_groups.py`; None = every query sees every query), and returns
`(intermediate, hidden_states, self_attentions, cross_attentions)`: every layer's output as given to the heads
`[decoder_layers, batch, num_queries, d_model]`, then the per-layer tuples or None.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention_mha import DetrCustomAttention
from .blocks import post_norm_feed_forward
from .configuration_detr_custom import DetrCustomConfig


class DetrCustomDecoderLayer(GradientCheckpointingLayer):
    """Post-norm decoder layer: self-attention between queries, cross-attention to the memory, FFN."""

    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        d_model = config.d_model
        heads = config.decoder_attention_heads
        self.self_attn = DetrCustomAttention(d_model, heads, config.attention_dropout, config)
        self.cross_attn = DetrCustomAttention(d_model, heads, config.attention_dropout, config)
        self.linear1 = nn.Linear(d_model, config.decoder_ffn_dim)
        self.linear2 = nn.Linear(config.decoder_ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.activation = ACT2FN[config.activation_function]

    def forward(self, hidden_states, query_pos, memory, memory_pos, memory_mask=None, output_attentions=False,
                self_attn_mask=None):
        query_key = hidden_states + query_pos
        attended, self_weights = self.self_attn(
            query_key, query_key, hidden_states, None, output_attentions, self_attn_mask)
        hidden_states = self.norm1(hidden_states + F.dropout(attended, self.dropout, self.training))
        attended, cross_weights = self.cross_attn(
            hidden_states + query_pos, memory + memory_pos, memory, memory_mask, output_attentions)
        hidden_states = self.norm2(hidden_states + F.dropout(attended, self.dropout, self.training))
        hidden_states = post_norm_feed_forward(self, hidden_states, self.norm3)
        return hidden_states, self_weights, cross_weights


class DetrCustomDecoder(nn.Module):
    """Decoder stack; returns every layer's output passed through the shared final LayerNorm.

    The original DETR keeps the residual stream un-normed and norms only the copies given to the heads.
    `normalize_decoder_residual=True` reproduces transformers' DetrDecoder with auxiliary loss instead: the normed
    state is fed to the next layer and the last state is normed twice.
    """

    multi_scale = False
    config_fields = ("normalize_decoder_residual",)   # fields only this part reads (PART_FIELDS)

    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        self.layers = nn.ModuleList(DetrCustomDecoderLayer(config) for _ in range(config.decoder_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.normalize_residual = config.normalize_decoder_residual

    def forward(self, query_pos, memory, memory_pos, memory_mask, output_attentions, output_hidden_states,
                self_attn_mask=None):
        hidden_states = torch.zeros_like(query_pos)                    # [batch, num_queries, d_model]
        intermediate, all_states = [], ((hidden_states,) if output_hidden_states else None)
        self_attentions, cross_attentions = ((), ()) if output_attentions else (None, None)
        for layer in self.layers:
            hidden_states, self_weights, cross_weights = layer(
                hidden_states, query_pos, memory, memory_pos, memory_mask, output_attentions, self_attn_mask)
            if self.normalize_residual:
                hidden_states = self.norm(hidden_states)
            intermediate.append(hidden_states if self.normalize_residual else self.norm(hidden_states))
            if output_hidden_states:
                all_states += (hidden_states,)
            if output_attentions:
                self_attentions += (self_weights,)
                cross_attentions += (cross_weights,)
        if self.normalize_residual:
            intermediate[-1] = self.norm(intermediate[-1])
        return torch.stack(intermediate), all_states, self_attentions, cross_attentions
