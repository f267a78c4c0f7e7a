"""Multi-head attention (the original's `nn.MultiheadAttention`), batch-first, through PyTorch's SDPA kernels.

Used by the encoder and decoder layers (`encoder_detr.py`, `decoder_detr.py`); its q / k / v / out projections are
the original's `in_proj_weight` split in three (see `checkpoint_conversion.convert_original_state_dict`).
"""
import torch
import torch.nn.functional as F
from torch import nn


class DetrCustomAttention(nn.Module):
    """Multi-head attention on batch-first sequences through `F.scaled_dot_product_attention`.

    With `output_attentions=True`, or when the model's `config._attn_implementation` is `"eager"`, the weights are
    computed explicitly with a softmax (same math, slower); the weights are returned only when asked for.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float, config=None):
        super().__init__()
        self.config = config                  # read at call time: `set_attn_implementation` changes it in place
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # [batch, heads, sequence, head_dim]

    def forward(
        self,
        query: torch.Tensor,                      # [batch, target, d_model]
        key: torch.Tensor,                        # [batch, source, d_model]
        value: torch.Tensor,                      # [batch, source, d_model]
        key_mask: torch.Tensor | None = None,     # [batch, source] bool, True = attend; None = attend everywhere
        output_attentions: bool = False,
        attn_mask: torch.Tensor | None = None,    # [target, source] bool, True = attend (e.g. query groups)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self._split_heads(self.q_proj(query)), self._split_heads(self.k_proj(key)), self._split_heads(
            self.v_proj(value))
        if key_mask is not None:
            key_mask = key_mask[:, None, None, :]                              # [batch, 1, 1, source]
            attn_mask = key_mask if attn_mask is None else key_mask & attn_mask  # [batch, 1, target, source]
        dropout = self.dropout if self.training else 0.0
        weights = None
        eager = self.config is not None and self.config._attn_implementation == "eager"
        if output_attentions or eager:
            scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)        # [batch, heads, target, source]
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        out = out.transpose(1, 2).flatten(2)                                  # [batch, target, d_model]
        return self.out_proj(out), weights if output_attentions else None
