"""Multi-scale features for the deformable variant (`config.num_feature_levels > 1`): the timm backbone's last stages,
each projected to d_model, extra stride-2 levels above them, and the flattened memory with its masks, shapes and
valid ratios, as Deformable DETR (Zhu et al. 2021) and RT-DETR (Zhao et al. 2024) feed their deformable decoders.

Levels: the backbone stages at stride >= `config.finest_level_stride` (timm's `feature_info` reductions; 8: C3, C4, C5
of a ResNet; 4: C2 too, for small objects), the last `num_feature_levels` of them, finest first; if
`num_feature_levels` exceeds them, each extra level is a 3x3 stride-2 convolution of the level below (the first of the
last backbone map itself, as Deformable DETR). Every level goes
through a 1x1 convolution + GroupNorm (Deformable DETR's `input_proj`; 3x3 stride 2 + GroupNorm for the extra levels),
or with `config.projection_norm="batch"` a 1x1 convolution without bias + BatchNorm (RT-DETR's `encoder_input_proj`).
Masks (True = real pixel) are the `pixel_mask` downsampled nearest-neighbour to each level, as the DETR backbone does;
`valid_ratios` are the visible fraction (width, height) of each level's padded map.
"""
import math

import torch
from torch import nn

from .backbone import DetrCustomBackbone, downsample_mask
from .configuration_detr_custom import DetrCustomConfig

# the finest levels `config.finest_level_stride` may ask for: stride 8 (C3, Deformable DETR's and RT-DETR's) or 4
# (C2: 4x the positions of stride 8, for objects that cover only a few stride-8 cells)
LEVEL_STRIDES = (4, 8)


def _group_norm(d_model: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, d_model), d_model)   # 32 groups, or the most that divide d_model


class ConvNormProjection(nn.Sequential):
    """conv + norm, a level's projection (`projection`); its own class so that the speed-up pass (`fast_paths.py`)
    finds the BatchNorm ones to fold."""


def projection(in_channels: int, d_model: int, norm: str, kernel_size: int = 1, stride: int = 1
               ) -> ConvNormProjection:
    """conv + GroupNorm (`norm="group"`, Deformable DETR's) or conv without bias + BatchNorm (`"batch"`, RT-DETR's:
    the norm's shift makes a bias redundant)."""
    conv = nn.Conv2d(in_channels, d_model, kernel_size, stride=stride, padding=kernel_size // 2, bias=norm == "group")
    return ConvNormProjection(conv, _group_norm(d_model) if norm == "group" else nn.BatchNorm2d(d_model))


class DetrCustomMultiScaleBackbone(DetrCustomBackbone):
    """`backbone.DetrCustomBackbone` (frozen BatchNorm, stem freezing, `backbone_weights`) with every
    stage out; `forward` returns the levels: its last stages at stride >= `config.finest_level_stride`, at most
    `num_feature_levels`, finest first."""

    def __init__(self, config: DetrCustomConfig):
        super().__init__(config, out_indices=None)
        finest = getattr(config, "finest_level_stride", 8)   # configs saved before the field: 8
        if finest not in LEVEL_STRIDES:
            raise ValueError(f"finest_level_stride={finest!r}: use one of {LEVEL_STRIDES}.")
        reductions = self.body.feature_info.reduction()
        candidates = [i for i, reduction in enumerate(reductions) if reduction >= finest]
        if not candidates:
            raise ValueError(f"backbone={config.backbone!r} has no feature stage at stride >= {finest} "
                             f"(reductions {reductions}); pick a timm model with a stride-{finest} or coarser stage.")
        self.level_indices = candidates[-config.num_feature_levels:]    # into the body's outputs, finest first
        if finest != 8 and reductions[self.level_indices[0]] != finest:
            # the stride-4 stage is the first candidate: fewer levels than candidates leave it out
            reached = [reductions[i] for i in self.level_indices]
            raise ValueError(
                f"finest_level_stride={finest} with num_feature_levels={config.num_feature_levels}: backbone="
                f"{config.backbone!r} has stages at strides {[reductions[i] for i in candidates]}, so "
                f"{config.num_feature_levels} levels read strides {reached} and never the stride-{finest} stage. Use "
                f"num_feature_levels >= {len(candidates)} (or finest_level_stride=8).")
        self.channels = [self.body.feature_info.channels()[i] for i in self.level_indices]   # per backbone level
        self.num_channels = self.channels[-1]

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:   # per level [batch, channels, h, w]
        features = self.run_body(pixel_values)
        return [features[i] for i in self.level_indices]


class DetrCustomMultiScaleProjection(nn.Module):
    """Each backbone level to d_model (1x1 conv + `config.projection_norm`), then the extra stride-2 levels (3x3
    conv + the same norm) up to `config.num_feature_levels`."""

    def __init__(self, config: DetrCustomConfig, backbone_channels: list[int]):
        super().__init__()
        d_model, norm = config.d_model, config.projection_norm
        self.levels = nn.ModuleList(projection(channels, d_model, norm) for channels in backbone_channels)
        extra = config.num_feature_levels - len(backbone_channels)
        self.extra_levels = nn.ModuleList(
            projection(backbone_channels[-1] if i == 0 else d_model, d_model, norm, kernel_size=3, stride=2)
            for i in range(extra))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:   # per level [batch, d_model, h, w]
        maps = [layer(feature) for layer, feature in zip(self.levels, features)]
        source = features[-1]
        for extra in self.extra_levels:
            source = extra(source)
            maps.append(source)
        return maps


def level_masks(pixel_mask: torch.Tensor, maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """`pixel_mask` [batch, height, width] (1 = real) downsampled nearest-neighbour to each map: [batch, h, w] bool."""
    return [downsample_mask(pixel_mask, level.shape[-2:]) for level in maps]


def valid_ratios(masks: list[torch.Tensor]) -> torch.Tensor:      # [batch, levels, 2], (width, height) in (0, 1]
    """The visible fraction of each level's padded map, as Deformable DETR's `get_valid_ratio`: boxes relative to the
    visible image times these ratios are the levels' padded coordinates."""
    ratios = []
    for mask in masks:
        height, width = mask.shape[-2:]
        visible_height = mask[:, :, 0].sum(1).float() / height
        visible_width = mask[:, 0, :].sum(1).float() / width
        ratios.append(torch.stack([visible_width, visible_height], -1))
    return torch.stack(ratios, 1)
