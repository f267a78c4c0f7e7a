"""DETR (Carion et al. 2020) as a Hugging Face model.

backbone (timm, frozen BatchNorm) -> 1x1 input projection -> transformer encoder (post-norm) -> decoder with
learned object queries -> class head (num_labels + 1, last = "no object") and 3-layer box MLP with sigmoid.

Conventions: `pixel_mask` is 1 on real pixels and 0 on padding (the HF polarity; the original DETR's
`NestedTensor.mask` is the reverse). Boxes are (center_x, center_y, width, height), normalized by the unpadded
(visible) image size. Sequences are batch-first: `[batch, sequence, d_model]`. In the paper's names the encoder
output is the `memory`, the learned object queries are `query_pos` and the decoder's input is zeros.
"""
import contextlib
import math
import operator
from dataclasses import dataclass

import timm
import torch
import torch.fx
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from timm.layers.norm_act import FrozenBatchNorm2d  # torchvision's class, as timm's freeze_batch_norm_2d makes it
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .configuration_detr_custom import DetrCustomConfig
from .loss_detr_custom import DetrCustomLoss

logger = logging.get_logger(__name__)


@dataclass
class DetrCustomModelOutput(ModelOutput):
    """Output of [`DetrCustomModel`].

    Args:
        last_hidden_state: `[batch, num_queries, d_model]`, the decoder's output after its final LayerNorm.
        intermediate_hidden_states: `[decoder_layers, batch, num_queries, d_model]`, every decoder layer's output as
            given to the heads (layer-normed); the last entry equals `last_hidden_state`.
        encoder_last_hidden_state: `[batch, height * width, d_model]`, the `memory`.
        feature_mask: `[batch, height, width]` bool, True on real feature cells; its shape gives the feature map
            size needed to reshape cross-attention maps into images.
        encoder_hidden_states, decoder_hidden_states: with `output_hidden_states=True`, tuples of
            `[batch, sequence, d_model]`: the input to the first layer, then each layer's output.
        encoder_attentions, decoder_attentions, cross_attentions: with `output_attentions=True`, tuples (one per
            layer) of `[batch, heads, target, source]` attention weights. Cross-attention is
            `[batch, heads, num_queries, height * width]`.
    """

    last_hidden_state: torch.Tensor | None = None
    intermediate_hidden_states: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    feature_mask: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class DetrCustomObjectDetectionOutput(ModelOutput):
    """Output of [`DetrCustomForObjectDetection`].

    Args:
        loss: scalar, only when `labels` are given: the weighted sum of the set-prediction losses.
        loss_dict: unweighted terms for logging (`loss_ce`, `loss_bbox`, `loss_giou`, `cardinality_error`,
            `class_error`, and `<name>_<layer>` for auxiliary decoder layers).
        logits: `[batch, num_queries, num_labels + 1]`, the last class is "no object".
        pred_boxes: `[batch, num_queries, 4]`, (center_x, center_y, width, height) in [0, 1] relative to each
            image's unpadded size.
        auxiliary_outputs: with `config.auxiliary_loss`, one `{"logits", "pred_boxes"}` dict per decoder layer
            before the last.
        The remaining fields are those of [`DetrCustomModelOutput`].
    """

    loss: torch.Tensor | None = None
    loss_dict: dict | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    auxiliary_outputs: list[dict] | None = None
    last_hidden_state: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    feature_mask: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_attentions: tuple[torch.Tensor, ...] | None = None
    decoder_attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


class DetrCustomBackbone(nn.Module):
    """A timm `features_only` model (BatchNorm frozen unless `config.freeze_batch_norm=False`); returns the last
    feature map and its mask."""

    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        try:
            body = timm.create_model(
                config.backbone, pretrained=config.use_pretrained_backbone, features_only=True, out_indices=(-1,),
                in_chans=config.num_channels, **({"output_stride": 16} if config.dilation else {}),
            )
        except (RuntimeError, AssertionError, TypeError, ValueError) as error:
            raise ValueError(
                f"timm could not build backbone={config.backbone!r} with features_only=True"
                f"{' and output_stride=16 (dilation)' if config.dilation else ''}: {error}. Pick a timm model that "
                "supports features_only (e.g. resnet50, resnet101, convnext_tiny)."
            ) from error
        self.body = freeze_batch_norm_2d(body) if config.freeze_batch_norm else body
        # frozen BatchNorm is folded into the convolutions when the body runs, see `folded_body`
        self.fold_batch_norm = config.freeze_batch_norm
        # fold and channels_last from this many pixels per image: below, the per-call pass over the weights and the
        # layout changes cost more than they save (2 x 160 x 128, resnet18: 92 ms plain, 177 ms folded)
        self.fast_path_min_pixels = 2 ** 17
        self._folded = None
        self.num_channels = self.body.feature_info.channels()[-1]     # 2048 for resnet50
        if config.freeze_backbone_stem:
            self._freeze_stem_and_first_stage()
        for module in self.body.modules():
            # timm initialized these (or they are loaded from a checkpoint): the HF init must not touch them
            module._is_hf_initialized = True

    def _freeze_stem_and_first_stage(self):
        # the original trains only layer2-4 of its ResNet; generalized: everything up to the first stage at stride 4
        first_stage = next(info["module"] for info in self.body.feature_info.info if info["reduction"] >= 4)
        first_stage = first_stage.replace(".", "_")                  # FeatureListNet flattens nested names
        for name, child in self.body.named_children():
            child.requires_grad_(False)
            if name == first_stage:
                break

    def folded_body(self) -> nn.Module:
        """`self.body` with each frozen BatchNorm folded into the convolution before it (`fold_frozen_batch_norm`):
        the same parameters and buffers, fewer passes over the activations. Built once, never in the state_dict."""
        if self._folded is None or self._folded[0] is not self.body:
            try:
                folded = fold_frozen_batch_norm(self.body)
            except Exception as error:  # noqa: BLE001 - a timm model that torch.fx cannot trace runs unfolded
                logger.warning_once(f"cannot fold the BatchNorm of backbone {type(self.body).__name__}: {error}")
                folded = self.body
            self._folded = (self.body, folded)                         # a tuple: not registered as a submodule
        return self._folded[1]

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        body = self.body
        if pixel_values.shape[-2] * pixel_values.shape[-1] >= self.fast_path_min_pixels:
            body = self.folded_body() if self.fold_batch_norm else self.body
            # channels_last: oneDNN's convolutions are ~1.4x faster in NHWC on CPU (forward and backward)
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        features = body(pixel_values)[-1]                              # [batch, channels, height, width]
        # nearest-neighbour downsampling of the mask, as the original does
        feature_mask = F.interpolate(pixel_mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
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


class _FrozenBatchNormTracer(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, FrozenBatchNorm2d) or super().is_leaf_module(module, qualified_name)


class ConvFrozenBatchNorm2d(nn.Module):
    """`norm(conv(x))` as one convolution: a frozen BatchNorm is x * scale + shift per channel, with
    scale = weight / sqrt(running_var + eps), so it folds into the convolution's weight (x scale) and bias.
    The fold is recomputed from the live tensors at every call (a pass over the weights, not over the much larger
    activations), so gradients reach `conv.weight` and no copy can go stale."""

    def __init__(self, conv: nn.Conv2d, norm: FrozenBatchNorm2d):
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, norm = self.conv, self.norm
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()   # [out_channels]
        shift = norm.bias - norm.running_mean * scale
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        weight = conv.weight * scale[:, None, None, None]             # [out_channels, in_channels, kh, kw]
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        # the weight in the input's memory format: mixed formats take a much slower path under bf16 autocast
        weight = weight.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return conv._conv_forward(x, weight, shift)


def fold_frozen_batch_norm(body: nn.Module) -> torch.fx.GraphModule:
    """`body` (traced with torch.fx) with every frozen BatchNorm whose input is a plain `nn.Conv2d` used by nothing
    else replaced by a `ConvFrozenBatchNorm2d` of the two: the graph proves the BatchNorm follows the convolution.
    Shares `body`'s modules, parameters and buffers; the state_dict keys stay those of `body`."""
    graph = _FrozenBatchNormTracer().trace(body)
    modules = dict(body.named_modules())
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], FrozenBatchNorm2d):
            continue
        conv_node = node.args[0]
        if not (isinstance(conv_node, torch.fx.Node) and conv_node.op == "call_module" and len(conv_node.users) == 1
                and type(modules[conv_node.target]) is nn.Conv2d):       # subclasses (e.g. StdConv2d) may rescale
            continue
        folded_name = f"{conv_node.target}_with_bn".replace(".", "_")
        modules[folded_name] = ConvFrozenBatchNorm2d(modules[conv_node.target], modules[node.target])
        conv_node.target = folded_name
        node.replace_all_uses_with(conv_node)
        graph.erase_node(node)
    for node in graph.nodes:
        # tracing turned the blocks' `x += shortcut` into `x + shortcut`: add in place again into a fresh conv output
        first = node.args[0] if node.op == "call_function" and node.target is operator.add else None
        if (isinstance(first, torch.fx.Node) and first.op == "call_module" and len(first.users) == 1
                and type(modules[first.target]) in (nn.Conv2d, ConvFrozenBatchNorm2d)):
            node.op, node.target = "call_method", "add_"
    return torch.fx.GraphModule(modules, graph, class_name=f"Folded{type(body).__name__}")


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
        computed once per shape."""
        if has_padding:
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


class DetrCustomAttention(nn.Module):
    """Multi-head attention on batch-first sequences through `F.scaled_dot_product_attention`.

    With `output_attentions=True` the weights are computed explicitly and returned (same result, slower).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self._split_heads(self.q_proj(query)), self._split_heads(self.k_proj(key)), self._split_heads(
            self.v_proj(value))
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]   # [batch, 1, 1, source]
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)        # [batch, heads, target, source]
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        out = out.transpose(1, 2).flatten(2)                                  # [batch, target, d_model]
        return self.out_proj(out), weights


class DetrCustomEncoderLayer(GradientCheckpointingLayer):
    """Post-norm encoder layer; positions are added to queries and keys, never to values."""

    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        d_model = config.d_model
        self.self_attn = DetrCustomAttention(d_model, config.encoder_attention_heads, config.attention_dropout)
        self.linear1 = nn.Linear(d_model, config.encoder_ffn_dim)
        self.linear2 = nn.Linear(config.encoder_ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.activation = ACT2FN[config.activation_function]

    def forward(self, hidden_states, position_embeddings, key_mask=None, output_attentions=False):
        query_key = hidden_states + position_embeddings
        attended, weights = self.self_attn(query_key, query_key, hidden_states, key_mask, output_attentions)
        hidden_states = self.norm1(hidden_states + F.dropout(attended, self.dropout, self.training))
        ffn = self.activation(self.linear1(hidden_states))
        ffn = self.linear2(F.dropout(ffn, self.activation_dropout, self.training))
        hidden_states = self.norm2(hidden_states + F.dropout(ffn, self.dropout, self.training))
        return hidden_states, weights


class DetrCustomDecoderLayer(GradientCheckpointingLayer):
    """Post-norm decoder layer: self-attention between queries, cross-attention to the memory, FFN."""

    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        d_model = config.d_model
        self.self_attn = DetrCustomAttention(d_model, config.decoder_attention_heads, config.attention_dropout)
        self.cross_attn = DetrCustomAttention(d_model, config.decoder_attention_heads, config.attention_dropout)
        self.linear1 = nn.Linear(d_model, config.decoder_ffn_dim)
        self.linear2 = nn.Linear(config.decoder_ffn_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = config.dropout
        self.activation_dropout = config.activation_dropout
        self.activation = ACT2FN[config.activation_function]

    def forward(self, hidden_states, query_pos, memory, memory_pos, memory_mask=None, output_attentions=False):
        query_key = hidden_states + query_pos
        attended, self_weights = self.self_attn(query_key, query_key, hidden_states, None, output_attentions)
        hidden_states = self.norm1(hidden_states + F.dropout(attended, self.dropout, self.training))
        attended, cross_weights = self.cross_attn(
            hidden_states + query_pos, memory + memory_pos, memory, memory_mask, output_attentions)
        hidden_states = self.norm2(hidden_states + F.dropout(attended, self.dropout, self.training))
        ffn = self.activation(self.linear1(hidden_states))
        ffn = self.linear2(F.dropout(ffn, self.activation_dropout, self.training))
        hidden_states = self.norm3(hidden_states + F.dropout(ffn, self.dropout, self.training))
        return hidden_states, self_weights, cross_weights


class DetrCustomEncoder(nn.Module):
    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        self.layers = nn.ModuleList(DetrCustomEncoderLayer(config) for _ in range(config.encoder_layers))

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


class DetrCustomDecoder(nn.Module):
    """Decoder stack; returns every layer's output passed through the shared final LayerNorm.

    The original DETR keeps the residual stream un-normed and norms only the copies given to the heads.
    `normalize_decoder_residual=True` reproduces transformers' DetrDecoder with auxiliary loss instead: the normed
    state is fed to the next layer and the last state is normed twice.
    """

    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        self.layers = nn.ModuleList(DetrCustomDecoderLayer(config) for _ in range(config.decoder_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.normalize_residual = config.normalize_decoder_residual

    def forward(self, query_pos, memory, memory_pos, memory_mask, output_attentions, output_hidden_states):
        hidden_states = torch.zeros_like(query_pos)                    # [batch, num_queries, d_model]
        intermediate, all_states = [], ((hidden_states,) if output_hidden_states else None)
        self_attentions, cross_attentions = ((), ()) if output_attentions else (None, None)
        for layer in self.layers:
            hidden_states, self_weights, cross_weights = layer(
                hidden_states, query_pos, memory, memory_pos, memory_mask, output_attentions)
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


class DetrCustomPreTrainedModel(PreTrainedModel):
    config_class = DetrCustomConfig
    config: DetrCustomConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DetrCustomBackbone", "DetrCustomEncoderLayer", "DetrCustomDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"num_batches_tracked"]

    @torch.no_grad()
    def _init_weights(self, module):
        # the original: xavier-uniform transformer weights, N(0, 1) query embeddings, U(0, 1) learned positions
        gain = self.config.init_xavier_std
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.xavier_uniform_(module.weight, gain=gain)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DetrCustomLearnedPositionEmbedding):
            init.uniform_(module.row_embed.weight)
            init.uniform_(module.col_embed.weight)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Loads our folders and Hub ids, and also transformers' DETR checkpoints (model_type "detr"), whose
        config and weights are converted on the fly (see `convert.py`). All of `PreTrainedModel.from_pretrained`'s
        options apply, e.g. `num_labels=K, ignore_mismatched_sizes=True` for a new class head."""
        from .convert import converted_transformers_folder

        with converted_transformers_folder(pretrained_model_name_or_path, kwargs) as folder:
            loaded = super().from_pretrained(folder or pretrained_model_name_or_path, *model_args, **kwargs)
        # loading replaces the parameters with trainable ones: freeze again what the config freezes
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for module in model.modules():
            if isinstance(module, DetrCustomBackbone) and model.config.freeze_backbone_stem:
                module._freeze_stem_and_first_stage()
        return loaded


class DetrCustomModel(DetrCustomPreTrainedModel):
    """The DETR backbone and transformer, without heads. Returns a [`DetrCustomModelOutput`]."""

    def __init__(self, config: DetrCustomConfig):
        super().__init__(config)
        self.backbone = DetrCustomBackbone(config)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, config.d_model, kernel_size=1)
        if config.position_embedding_type == "sine":
            self.position_embedding = DetrCustomSinePositionEmbedding(config.d_model)
        else:
            self.position_embedding = DetrCustomLearnedPositionEmbedding(config.d_model)
        self.query_embed = nn.Embedding(config.num_queries, config.d_model)   # the learned object queries
        self.encoder = DetrCustomEncoder(config)
        self.decoder = DetrCustomDecoder(config)
        self.post_init()

    def _check_inputs(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be [batch, {self.config.num_channels}, height, width] (config.num_channels="
                f"{self.config.num_channels}), got shape {list(pixel_values.shape)}. Use DetrCustomImageProcessor "
                "to build it from images."
            )
        batch, _, height, width = pixel_values.shape
        if pixel_mask is None:
            return torch.ones((batch, height, width), dtype=torch.bool, device=pixel_values.device)
        if tuple(pixel_mask.shape) != (batch, height, width):
            raise ValueError(
                f"pixel_mask must be [batch, height, width] = {[batch, height, width]} to match pixel_values, got "
                f"{list(pixel_mask.shape)}. It is 1 on real pixels and 0 on padding."
            )
        return pixel_mask

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        batch_independent: bool | None = None,
        **kwargs,
    ) -> DetrCustomModelOutput:
        """
        Args:
            pixel_values: `[batch, num_channels, height, width]`, normalized images padded bottom-right.
            pixel_mask: `[batch, height, width]`, 1 on real pixels and 0 on padding (None = no padding).
            output_attentions / output_hidden_states: also return per-layer attention maps / hidden states.
            batch_independent: run the backbone on each image unpadded (same-size images together) and pad the
                feature maps instead of the pixels, so that an image's outputs equal its single-image outputs
                whatever else is in the batch. Padding otherwise changes the convolutions near the border of the
                visible region, as in the original DETR and transformers (a 600x799 image padded to 800x1066: up to
                0.24 on the logits of a random R50 in both). Costs one backbone call per distinct image size.
                Default: `config.batch_independent_inference` if set, else False.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states)
        if batch_independent is None:
            batch_independent = getattr(self.config, "batch_independent_inference", False)
        pixel_mask = self._check_inputs(pixel_values, pixel_mask)
        if batch_independent:
            features, feature_mask = self.backbone.forward_per_size(pixel_values, pixel_mask)
        else:
            features, feature_mask = self.backbone(pixel_values, pixel_mask)
        with fp32_on_cpu(features) as features:
            has_padding = not bool(feature_mask.all())
            memory_pos = self.position_embedding(feature_mask, has_padding).to(features.dtype)  # [batch, h * w, d]
            source = self.input_proj(features).flatten(2).transpose(1, 2)      # [batch, height * width, d_model]
            # without padding every key is valid: no mask lets SDPA pick its fastest kernel
            key_mask = feature_mask.flatten(1) if has_padding else None       # [batch, height * width]
            memory, encoder_states, encoder_attentions = self.encoder(
                source, memory_pos, key_mask, output_attentions, output_hidden_states)
            query_pos = self.query_embed.weight[None].expand(source.shape[0], -1, -1)  # [batch, queries, d_model]
            intermediate, decoder_states, decoder_attentions, cross_attentions = self.decoder(
                query_pos, memory, memory_pos, key_mask, output_attentions, output_hidden_states)
        return DetrCustomModelOutput(
            last_hidden_state=intermediate[-1],
            intermediate_hidden_states=intermediate,
            encoder_last_hidden_state=memory,
            feature_mask=feature_mask,
            encoder_hidden_states=encoder_states,
            decoder_hidden_states=decoder_states,
            encoder_attentions=encoder_attentions,
            decoder_attentions=decoder_attentions,
            cross_attentions=cross_attentions,
        )


class DetrCustomMLP(nn.Module):
    """A small feed-forward network (ReLU between layers), the box head."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DetrCustomForObjectDetection(DetrCustomPreTrainedModel):
    """DETR with its class and box heads and the set-prediction loss.

    `labels`: one dict per image with `class_labels` int64 `[num_objects]` in `[0, num_labels)` and `boxes` float
    `[num_objects, 4]`, (center_x, center_y, width, height) normalized by the image's unpadded size. The loss is
    computed whenever labels are given, in train or eval mode, by our own criterion ([`DetrCustomLoss`]).
    """

    def __init__(self, config: DetrCustomConfig):
        super().__init__(config)
        self.model = DetrCustomModel(config)
        self.class_embed = nn.Linear(config.d_model, config.num_labels + 1)   # + 1: "no object"
        self.bbox_embed = DetrCustomMLP(config.d_model, config.d_model, 4, num_layers=3)
        self.criterion = DetrCustomLoss(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict] | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        batch_independent: bool | None = None,
        **kwargs,
    ) -> DetrCustomObjectDetectionOutput:
        """See [`DetrCustomModel.forward`]; `labels` as in the class docstring."""
        outputs = self.model(pixel_values, pixel_mask, output_attentions, output_hidden_states,
                             batch_independent=batch_independent)
        intermediate = outputs.intermediate_hidden_states               # [decoder_layers, batch, queries, d_model]
        if not self.config.auxiliary_loss:
            intermediate = intermediate[-1:]
        with fp32_on_cpu(intermediate) as intermediate:
            all_logits = self.class_embed(intermediate)                 # [layers, batch, queries, num_labels + 1]
            all_boxes = self.bbox_embed(intermediate).sigmoid()         # [layers, batch, queries, 4]
        auxiliary_outputs = None
        if self.config.auxiliary_loss:
            auxiliary_outputs = [{"logits": logits, "pred_boxes": boxes}
                                 for logits, boxes in zip(all_logits[:-1], all_boxes[:-1])]
        loss, loss_dict = None, None
        if labels is not None:
            loss, loss_dict = self.criterion(all_logits[-1], all_boxes[-1], labels, auxiliary_outputs)
        return DetrCustomObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=all_logits[-1],
            pred_boxes=all_boxes[-1],
            auxiliary_outputs=auxiliary_outputs,
            last_hidden_state=outputs.last_hidden_state,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            feature_mask=outputs.feature_mask,
            encoder_hidden_states=outputs.encoder_hidden_states,
            decoder_hidden_states=outputs.decoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
        )
