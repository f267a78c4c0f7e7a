"""RT-DETR's cross-scale feature fusion (CCFF; Zhao et al. 2024, section 4.2), the convolutional half of its hybrid
encoder (`config.encoder_type="hybrid"`, `DetrCustomHybridEncoder`, with a multi-scale decoder): after the attention
within the coarsest level (AIFI, the DETR encoder's `encode_levels`), a top-down path (FPN) and a bottom-up path (PAN)
fuse the backbone levels with convolutions.

Top-down, from the coarsest level: a 1x1 lateral conv, nearest upsampling to the next finer level's size,
concatenation with it and a CSP block of RepVGG blocks; bottom-up, from the finest: a 3x3 stride-2 conv,
concatenation with the next coarser top-down map and another CSP block. Every conv is conv + BatchNorm (+ SiLU where
RT-DETR has an activation). Module and parameter names are transformers' `RTDetrHybridEncoder`'s, and with the same
weights the fused maps are theirs (tests/test_encoder_hybrid.py); upsampling goes to the finer map's size rather than
by a factor of 2, so images whose sides are not multiples of the coarsest stride work too (equal where the factor is
2).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .configuration_detr_custom import DetrCustomConfig
from .encoder_detr import DetrCustomEncoder


# RT-DETR's: SiLU after the fusion convs, 3 RepVGG blocks per CSP block, BatchNorm eps 1e-5
ACTIVATION = nn.SiLU
NUM_BLOCKS = 3
BATCH_NORM_EPS = 1e-5


class ConvNormLayer(nn.Module):
    """conv (no bias) + BatchNorm (+ activation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, activation=None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2,
                              bias=False)
        self.norm = nn.BatchNorm2d(out_channels, BATCH_NORM_EPS)
        self.activation = nn.Identity() if activation is None else activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))


class RepVggBlock(nn.Module):
    """act(conv3x3(x) + conv1x1(x)) (RepVGG's training-time form; Ding et al. 2021)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = ConvNormLayer(channels, channels, 3)
        self.conv2 = ConvNormLayer(channels, channels, 1)
        self.activation = ACTIVATION()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the speed-up pass (`fast_paths.py`) merges both branches into one 3x3 convolution at inference (RepVGG's
        # re-parameterization)
        return self.activation(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """Cross Stage Partial block: two 1x1 branches of the concatenated input, one through RepVGG blocks, summed."""

    def __init__(self, d_model: int, hidden_expansion: float):
        super().__init__()
        hidden = int(d_model * hidden_expansion)
        self.conv1 = ConvNormLayer(2 * d_model, hidden, 1, activation=ACTIVATION)
        self.conv2 = ConvNormLayer(2 * d_model, hidden, 1, activation=ACTIVATION)
        self.bottlenecks = nn.Sequential(*[RepVggBlock(hidden) for _ in range(NUM_BLOCKS)])
        self.conv3 = nn.Identity() if hidden == d_model else ConvNormLayer(hidden, d_model, 1, activation=ACTIVATION)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # [batch, 2 * d_model, h, w] -> [batch, d_model, h, w]
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class DetrCustomCrossScaleFusion(nn.Module):
    """CCFF over `num_levels` maps of `d_model` channels, finest first (see the module docstring)."""

    def __init__(self, d_model: int, num_levels: int, hidden_expansion: float = 1.0):
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"cross-scale fusion needs at least 2 backbone levels, got {num_levels}: use "
                             "num_feature_levels >= 2 with a backbone that has stages at stride 8 and coarser.")
        stages = num_levels - 1
        self.lateral_convs = nn.ModuleList(ConvNormLayer(d_model, d_model, 1, activation=ACTIVATION)
                                           for _ in range(stages))
        self.fpn_blocks = nn.ModuleList(CSPRepLayer(d_model, hidden_expansion) for _ in range(stages))
        self.downsample_convs = nn.ModuleList(ConvNormLayer(d_model, d_model, 3, stride=2, activation=ACTIVATION)
                                              for _ in range(stages))
        self.pan_blocks = nn.ModuleList(CSPRepLayer(d_model, hidden_expansion) for _ in range(stages))

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:   # per level [batch, d_model, h, w]
        # top-down: coarsest first; each lateral-conv'd map replaces its own entry and feeds the finer level
        top_down = [maps[-1]]
        for index, (lateral, block) in enumerate(zip(self.lateral_convs, self.fpn_blocks)):
            finer = maps[-2 - index]
            top_down[-1] = lateral(top_down[-1])
            upsampled = F.interpolate(top_down[-1], size=finer.shape[-2:], mode="nearest")
            top_down.append(block(torch.cat([upsampled, finer], 1)))
        top_down.reverse()                                                 # finest first
        # bottom-up: finest first
        fused = [top_down[0]]
        for index, (downsample, block) in enumerate(zip(self.downsample_convs, self.pan_blocks)):
            coarser = top_down[index + 1]
            down = downsample(fused[-1])
            # a 3x3 stride-2 conv halves rounding up, as the backbone's stages do (2k + 1 cells -> k + 1)
            assert down.shape[-2:] == coarser.shape[-2:], (down.shape, coarser.shape)
            fused.append(block(torch.cat([down, coarser], 1)))
        return fused


class DetrCustomHybridEncoder(DetrCustomEncoder):
    """RT-DETR's hybrid encoder: the DETR encoder on the coarsest backbone level (AIFI, its `layers`), then the
    cross-scale fusion of the backbone levels (`fusion`); the extra stride-2 levels pass through."""

    multi_scale = True
    config_fields = ("hidden_expansion",)   # fields only this part reads (PART_FIELDS)

    def __init__(self, config: DetrCustomConfig, backbone_levels: int = 1):
        super().__init__(config, backbone_levels)
        self.fusion = DetrCustomCrossScaleFusion(config.d_model, backbone_levels, config.hidden_expansion)

    def encode_levels(self, maps, masks, valid_ratios, position_embedding, output_attentions, output_hidden_states):
        maps, states, attentions = super().encode_levels(maps, masks, valid_ratios, position_embedding,
                                                         output_attentions, output_hidden_states)
        maps[:self.encoder_level + 1] = self.fusion(maps[:self.encoder_level + 1])
        return maps, states, attentions
