"""Position encodings of the feature map cells, as in facebookresearch/detr models/position_encoding.py: fixed sine
(normalized over each image's unmasked region) or learned row / column embeddings, and RT-DETR's unnormalized sine of
the cell indices (its AIFI's), chosen by `config.position_embedding_type` through `build_position_embedding`.

Both take the feature mask `[batch, height, width]` (True = real cell) and return `[batch, height * width, d_model]`.
"""
import math

import torch
from torch import nn

from .configuration_detr_custom import DetrCustomConfig
from .inputs_detr_custom import tracing


class DetrCustomSinePositionEmbedding(nn.Module):
    """Sine/cosine of each cell's y and x, normalized to [0, 2 pi] over the unmasked region of its image."""

    max_cached_shapes = 16

    def __init__(self, d_model: int, temperature: float = 10000.0):
        super().__init__()
        self.num_pos_feats = d_model // 2
        self.temperature = temperature
        self._cache = {}                  # (height, width, device) -> [1, height * width, d_model], for unpadded maps

    def forward(self, feature_mask: torch.Tensor, has_padding: bool = True) -> torch.Tensor:
        """`has_padding=False` promises `feature_mask.all()`: the encoding then depends on the shape only and is
        computed once per shape (in eager mode)."""
        if has_padding or tracing():      # a captured graph computes it: no cache, no shape-keyed dict
            return self._encode(feature_mask)
        batch, height, width = feature_mask.shape
        key = (height, width, feature_mask.device)
        if key not in self._cache:
            if len(self._cache) >= self.max_cached_shapes:
                self._cache.clear()
            with torch.inference_mode(False), torch.no_grad():   # a plain tensor, usable later with autograd too
                self._cache[key] = self._encode(torch.ones((1, height, width), dtype=torch.bool,
                                                           device=feature_mask.device))
        return self._cache[key].expand(batch, -1, -1)

    def _encode(self, feature_mask: torch.Tensor) -> torch.Tensor:
        # matches facebookresearch/detr models/position_encoding.py (PositionEmbeddingSine, normalize=True)
        y_embed = feature_mask.cumsum(1, dtype=torch.float32)          # [batch, height, width]
        x_embed = feature_mask.cumsum(2, dtype=torch.float32)
        y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * (2 * math.pi)
        x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * (2 * math.pi)
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=feature_mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t                             # [batch, height, width, d_model / 2]
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).flatten(1, 2)          # [batch, height * width, d_model]


class DetrCustomAbsoluteSinePositionEmbedding(DetrCustomSinePositionEmbedding):
    """RT-DETR's 2D sine/cosine (its AIFI's position embedding, Zhao et al. 2024): of each cell's row and column index,
    counted from 0 and not normalized, laid out [sin y | cos y | sin x | cos x], with the same frequencies as the
    DETR sine. A real cell's encoding does not depend on the padding, so it is computed once per shape."""

    def forward(self, feature_mask: torch.Tensor, has_padding: bool = True) -> torch.Tensor:
        return super().forward(feature_mask, has_padding=False)

    def _encode(self, feature_mask: torch.Tensor) -> torch.Tensor:
        _, height, width = feature_mask.shape
        quarter = self.num_pos_feats // 2                               # frequencies per axis
        # computed in float64 as transformers' build_2d_sinusoidal_position_embedding (MPS has none), then cast
        device = feature_mask.device
        wide = torch.float32 if device.type == "mps" else torch.float64
        omega = 1.0 / self.temperature ** (torch.arange(quarter, dtype=wide, device=device) / quarter)
        rows, cols = torch.meshgrid(torch.arange(height, dtype=wide, device=device),
                                    torch.arange(width, dtype=wide, device=device), indexing="ij")
        angle_y = rows.flatten()[:, None] * omega                        # [height * width, d_model / 4]
        angle_x = cols.flatten()[:, None] * omega
        encoding = torch.cat([angle_y.sin(), angle_y.cos(), angle_x.sin(), angle_x.cos()], 1)
        return encoding.float()[None]                                   # [1, height * width, d_model]


class DetrCustomLearnedPositionEmbedding(nn.Module):
    """Learned row and column embeddings for feature maps up to 50 x 50 cells."""

    max_cells = 50

    def __init__(self, d_model: int):
        super().__init__()
        self.row_embed = nn.Embedding(self.max_cells, d_model // 2)
        self.col_embed = nn.Embedding(self.max_cells, d_model // 2)

    def forward(self, feature_mask: torch.Tensor, has_padding: bool = True) -> torch.Tensor:
        batch, height, width = feature_mask.shape
        if height > self.max_cells or width > self.max_cells:
            raise ValueError(
                f"learned position embeddings cover at most {self.max_cells} x {self.max_cells} feature cells, got "
                f"{height} x {width}: use smaller images or position_embedding_type='sine'."
            )
        x_emb = self.col_embed(torch.arange(width, device=feature_mask.device))    # [width, d_model / 2]
        y_emb = self.row_embed(torch.arange(height, device=feature_mask.device))   # [height, d_model / 2]
        pos = torch.cat([x_emb[None].expand(height, -1, -1), y_emb[:, None].expand(-1, width, -1)], dim=-1)
        return pos.flatten(0, 1)[None].expand(batch, -1, -1)           # [batch, height * width, d_model]


# config.position_embedding_type -> class; the keys are configuration_detr_custom.POSITION_EMBEDDING_TYPES
POSITION_EMBEDDING_CLASSES = {
    "sine": DetrCustomSinePositionEmbedding,
    "learned": DetrCustomLearnedPositionEmbedding,
    "sine_absolute": DetrCustomAbsoluteSinePositionEmbedding,
}


def build_position_embedding(config: DetrCustomConfig) -> nn.Module:
    return POSITION_EMBEDDING_CLASSES[config.position_embedding_type](config.d_model)
