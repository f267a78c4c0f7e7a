"""DETR (Carion et al. 2020) as a Hugging Face model.

backbone (timm, frozen BatchNorm) -> 1x1 input projection -> transformer encoder (post-norm) -> decoder with
learned object queries -> class head (num_labels + 1, last = "no object") and 3-layer box MLP with sigmoid.

Conventions: `pixel_mask` is 1 on real pixels and 0 on padding (the HF polarity; the original DETR's
`NestedTensor.mask` is the reverse). Boxes are (center_x, center_y, width, height), normalized by the unpadded
(visible) image size. Sequences are batch-first: `[batch, sequence, d_model]`. In the paper's names the encoder
output is the `memory`, the learned object queries are `query_pos` and the decoder's input is zeros.
"""
import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_detr_custom import DetrCustomConfig
from .loss_detr_custom import DetrCustomLoss

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


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

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(pixel_values)[-1]                         # [batch, channels, height, width] at stride 32
        # nearest-neighbour downsampling of the mask, as the original does
        feature_mask = F.interpolate(pixel_mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, feature_mask                                  # mask: [batch, height, width], True = real


class DetrCustomSinePositionEmbedding(nn.Module):
    """Sine/cosine of each cell's y and x, normalized to [0, 2 pi] over the unmasked region of its image."""

    def __init__(self, d_model: int, temperature: float = 10000.0):
        super().__init__()
        self.num_pos_feats = d_model // 2
        self.temperature = temperature

    def forward(self, feature_mask: torch.Tensor) -> torch.Tensor:
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

    def forward(self, feature_mask: torch.Tensor) -> torch.Tensor:
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
        self.activation = ACTIVATIONS[config.activation_function]

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
        self.activation = ACTIVATIONS[config.activation_function]

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
            return super().from_pretrained(folder or pretrained_model_name_or_path, *model_args, **kwargs)


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
        **kwargs,
    ) -> DetrCustomModelOutput:
        """
        Args:
            pixel_values: `[batch, num_channels, height, width]`, normalized images padded bottom-right.
            pixel_mask: `[batch, height, width]`, 1 on real pixels and 0 on padding (None = no padding).
            output_attentions / output_hidden_states: also return per-layer attention maps / hidden states.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states)
        pixel_mask = self._check_inputs(pixel_values, pixel_mask)
        features, feature_mask = self.backbone(pixel_values, pixel_mask)
        memory_pos = self.position_embedding(feature_mask).to(features.dtype)   # [batch, height * width, d_model]
        source = self.input_proj(features).flatten(2).transpose(1, 2)          # [batch, height * width, d_model]
        # without padding every key is valid: no mask lets SDPA pick its fastest kernel
        key_mask = None if bool(feature_mask.all()) else feature_mask.flatten(1)  # [batch, height * width]
        memory, encoder_states, encoder_attentions = self.encoder(
            source, memory_pos, key_mask, output_attentions, output_hidden_states)
        query_pos = self.query_embed.weight[None].expand(source.shape[0], -1, -1)  # [batch, num_queries, d_model]
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
        **kwargs,
    ) -> DetrCustomObjectDetectionOutput:
        """See [`DetrCustomModel.forward`]; `labels` as in the class docstring."""
        outputs = self.model(pixel_values, pixel_mask, output_attentions, output_hidden_states)
        intermediate = outputs.intermediate_hidden_states               # [decoder_layers, batch, queries, d_model]
        if not self.config.auxiliary_loss:
            intermediate = intermediate[-1:]
        all_logits = self.class_embed(intermediate)                     # [layers, batch, queries, num_labels + 1]
        all_boxes = self.bbox_embed(intermediate).sigmoid()             # [layers, batch, queries, 4]
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
