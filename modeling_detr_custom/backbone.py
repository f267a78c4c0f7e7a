"""The backbone: a timm `features_only` model whose last feature map feeds the transformer, with its mask.

Holds the stem freezing of the original DETR and batch-independent inference (`forward_per_size`); the loading of a
local weights file (`config.backbone_weights`) comes from `backbone_weights.py`. Plain PyTorch: the folded BatchNorm
and channels_last speed-ups are the pass in `fast_paths.py`, which overrides `run_body`.
"""
import contextvars

import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from torch import nn

from .backbone_weights import keys_dropped_by_features_only, load_backbone_weights
from .configuration_detr_custom import DetrCustomConfig

# True while `DetrCustomPreTrainedModel.from_pretrained` builds the model: the checkpoint holds every weight, so timm
# must not fetch ImageNet weights that would be overwritten anyway (transformers' DETR does, transformers#15764)
LOADING_CHECKPOINT = contextvars.ContextVar("detr_custom_loading_checkpoint", default=False)


def downsample_mask(pixel_mask: torch.Tensor, size) -> torch.Tensor:
    """`pixel_mask` [batch, height, width] (1 = real) to a feature map's size, nearest-neighbour as the original
    DETR: [batch, h, w] bool, True = real."""
    return F.interpolate(pixel_mask[None].float(), size=size).to(torch.bool)[0]


def add_first_block_shortcut(body: nn.Module, name: str) -> None:
    """Gives block 0 of a timm ResNet's first stage (`layer1.0`, basic blocks) a 1x1 conv + BatchNorm shortcut where
    timm has the identity: RT-DETR's ResNet-vd with basic blocks projects the shortcut of every stage's first block.
    Laid out as timm's average-pool shortcuts (`downsample.1` conv, `downsample.2` norm; no pooling at stride 1)."""
    stage = getattr(body, "layer1", None)
    block = stage[0] if stage is not None else None
    if block is None or not hasattr(block, "downsample") or hasattr(block, "conv3"):
        raise ValueError(f"backbone_first_block_shortcut=True needs a timm ResNet with basic blocks (e.g. resnet18d, "
                         f"resnet34d); backbone={name!r} has no such first block.")
    if block.downsample is None:
        channels = block.conv1.in_channels
        block.downsample = nn.Sequential(nn.Identity(), nn.Conv2d(channels, block.conv2.out_channels, 1, bias=False),
                                         nn.BatchNorm2d(block.conv2.out_channels))
        nn.init.kaiming_normal_(block.downsample[1].weight, mode="fan_out", nonlinearity="relu")


class DetrCustomBackbone(nn.Module):
    """A timm `features_only` model (BatchNorm frozen unless `config.freeze_batch_norm=False`); returns the last
    feature map and its mask."""

    def __init__(self, config: DetrCustomConfig, out_indices: tuple | None = (-1,)):
        """`out_indices`: the stages `body` returns (timm's; None = every stage, for `multiscale.py`)."""
        super().__init__()
        loading_checkpoint = LOADING_CHECKPOINT.get()
        # a local weights file replaces timm's download: the Hub is never asked when one is given
        weights_file = config.backbone_weights
        pretrained = config.use_pretrained_backbone and weights_file is None and not loading_checkpoint
        create_kwargs = {"in_chans": config.num_channels, **({"output_stride": 16} if config.dilation else {})}
        stages = {} if out_indices is None else {"out_indices": out_indices}
        try:
            body = timm.create_model(
                config.backbone, pretrained=pretrained, features_only=True, **stages, **create_kwargs)
        except OSError as error:   # huggingface_hub's: no network, or the Hub is unreachable, and nothing cached
            if not pretrained:
                raise
            raise OSError(
                f"backbone={config.backbone!r}: timm could not download its pretrained weights ({error}). Without "
                "network, build the model with use_pretrained_backbone=False (--use_pretrained_backbone false: random "
                "backbone weights), or give a local weights file with backbone_weights=PATH."
            ) from error
        except (RuntimeError, AssertionError, TypeError, ValueError) as error:
            raise ValueError(
                f"timm could not build backbone={config.backbone!r} with features_only=True"
                f"{' and output_stride=16 (dilation)' if config.dilation else ''}: {error}. Pick a timm model that "
                "supports features_only (e.g. resnet50, resnet101, convnext_tiny)."
            ) from error
        if weights_file is not None and not loading_checkpoint:      # the checkpoint holds these weights already
            load_backbone_weights(
                body, weights_file, sha256=config.backbone_weights_sha256, model_name=config.backbone,
                ignored_keys=keys_dropped_by_features_only(body, config.backbone, **create_kwargs))
        if getattr(config, "backbone_first_block_shortcut", False):
            add_first_block_shortcut(body, config.backbone)
        self.body = freeze_batch_norm_2d(body) if config.freeze_batch_norm else body
        self.num_channels = self.body.feature_info.channels()[-1]     # 2048 for resnet50
        if config.freeze_backbone_stem:
            self._freeze_stem_and_first_stage()
        for module in self.body.modules():
            # timm initialized these (or they are loaded from a checkpoint): the HF init must not touch them
            module._is_hf_initialized = True

    def _freeze_stem_and_first_stage(self):
        # the original trains only layer2-4 of its ResNet; generalized: everything up to the first stage at stride 4
        first_stage = next(info["module"] for info in self.body.feature_info.info if info["reduction"] >= 4)
        modules = dict(self.body.named_modules())
        # FeatureListNet flattens nested names (layer1, stages_0); EfficientNetFeatures keeps them (blocks.1)
        first_stage = first_stage if first_stage in modules else first_stage.replace(".", "_")
        assert first_stage in modules, f"{first_stage} is not a module of {type(self.body).__name__}"
        inside_seen = False
        for name, parameter in self.body.named_parameters():       # in registration order: stem first
            inside = name.startswith(first_stage + ".")
            if inside_seen and not inside:
                break
            inside_seen |= inside
            parameter.requires_grad_(False)

    def run_body(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The body's feature maps (those of `out_indices`)."""
        return self.body(pixel_values)

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.run_body(pixel_values)[-1]                     # [batch, channels, height, width]
        feature_mask = downsample_mask(pixel_mask, features.shape[-2:])
        return features, feature_mask                                  # mask: [batch, height, width], True = real

    def forward_per_size(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
        """Like `forward`, but each image goes through the body unpadded (images of one size together) and the
        feature maps are padded afterwards: an image's features no longer depend on the other images of the batch
        (convolutions near a padded border do). Needs each image's real pixels in its top-left corner."""
        heights = pixel_mask.any(2).sum(1).tolist()                    # [batch] rows holding real pixels
        widths = pixel_mask.any(1).sum(1).tolist()
        groups = {}
        for index, size in enumerate(zip(heights, widths)):
            groups.setdefault(size, []).append(index)
        group_features = {}
        for (height, width), indices in groups.items():
            region = pixel_mask[indices, :height, :width]
            if height == 0 or width == 0 or not region.all() or int(pixel_mask[indices].sum()) != region.numel():
                raise ValueError(
                    f"batch_independent=True needs every image's real pixels (pixel_mask 1) to fill a rectangle in "
                    f"its top-left corner, padding bottom-right; images {indices} do not.")
            group_features[height, width] = self.forward(
                pixel_values[indices, :, :height, :width], pixel_mask[indices, :height, :width])[0]
        feature_height = max(f.shape[-2] for f in group_features.values())
        feature_width = max(f.shape[-1] for f in group_features.values())
        some = next(iter(group_features.values()))
        features = some.new_zeros((len(heights), some.shape[1], feature_height, feature_width))
        feature_mask = torch.zeros((len(heights), feature_height, feature_width), dtype=torch.bool,
                                   device=some.device)
        for size, group in group_features.items():
            indices = groups[size]
            features[indices, :, :group.shape[-2], :group.shape[-1]] = group
            feature_mask[indices, :group.shape[-2], :group.shape[-1]] = True
        return features, feature_mask                                  # as `forward`: [batch, channels, h, w], mask
