"""The multi-scale assembly (a decoder with `multi_scale = True` in `registry.py`, e.g. `decoder_type="deformable"`,
Deformable DETR's decoder, Zhu et al. 2021), one module that `DetrCustomForObjectDetection` holds as its `model`.

multi-scale features (`multiscale.py`) -> the registered encoder's `encode_levels` (`config.encoder_type`: "detr" on
the coarsest backbone level only, RT-DETR's AIFI, Zhao et al. 2024, the other levels passing through; "hybrid" the
same followed by RT-DETR's cross-scale fusion; "deformable" Deformable DETR's encoder over every level), with
`decoder_input_proj` RT-DETR's per-level conv + BatchNorm -> the registered query source (`query_sources.py`:
learned content queries with learned reference boxes, DAB-DETR's anchors, or with `config.two_stage` the encoder's
top proposals, `query_selection.py`); in training the denoising groups (`denoising.py`) -> the registered decoder (the
deformable one's layers each refine the boxes with their own box head: iterative box refinement, stop-gradient
between layers) -> the registered heads, one class head per layer (`heads.py`).

The heads sit here, not in `DetrCustomForObjectDetection`, because the refinement needs a box head inside every
layer; the output carries each layer's logits and boxes, which `DetrCustomForObjectDetection.forward` takes as they
are (the single-scale assembly's come from its own heads): one detection forward, loss and outputs for every variant.
"""
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .blocks import MLP, flatten_levels, fp32_on_cpu, mask_if_padded
from .class_head import init_class_head_bias_
from .configuration_detr_custom import DetrCustomConfig
from .denoising import denoising_groups, denoising_indices
from .inputs_detr_custom import check_pixel_inputs
from .multiscale import (DetrCustomMultiScaleBackbone, DetrCustomMultiScaleProjection, level_masks, projection,
                         valid_ratios)
from .position_encoding import build_position_embedding
from .query_groups import group_attention_mask, with_denoising_mask
from .registry import build_decoder, build_encoder, build_heads, build_query_source, encoder_class


@dataclass
class DetrCustomDeformableDetectorOutput(ModelOutput):
    """What [`DetrCustomDeformableDetector`] returns; the per-layer heads' outputs first."""

    logits: torch.Tensor | None = None                # [decoder_layers, batch, queries, classes]
    pred_boxes: torch.Tensor | None = None            # [decoder_layers, batch, queries, 4] cxcywh in [0, 1]
    last_hidden_state: torch.Tensor | None = None     # [batch, queries, d_model]
    intermediate_hidden_states: torch.Tensor | None = None   # [decoder_layers, batch, queries, d_model]
    encoder_last_hidden_state: torch.Tensor | None = None    # [batch, sequence, d_model], all levels flattened
    feature_mask: torch.Tensor | None = None          # [batch, height, width] bool, the encoder level's mask
    spatial_shapes: list | None = None                # [levels] of (height, width), finest first
    encoder_hidden_states: tuple | None = None        # with output_hidden_states: [batch, h * w, d_model] of the
    encoder_attentions: tuple | None = None           # coarsest level; attentions [batch, heads, h * w, h * w]
    #                                                   (encoder_type "deformable": every level, [batch, sequence,
    #                                                   d_model]; attentions [batch, sequence, heads, points])
    decoder_hidden_states: tuple | None = None        # [batch, queries, d_model], input + each layer
    cross_attentions: tuple | None = None             # per layer [batch, queries, heads, levels * points]
    enc_logits: torch.Tensor | None = None            # two_stage: the selected proposals' [batch, queries, classes]
    enc_pred_boxes: torch.Tensor | None = None        # two_stage: and their boxes [batch, queries, 4]
    denoising: dict | None = None                     # training with num_denoising: the denoising queries' per-layer
    #                                                   logits and pred_boxes, indices and num_groups (the loss's)


class DetrCustomDeformableDetector(nn.Module):
    """Backbone to per-layer class logits and refined boxes for `decoder_type="deformable"` (see the module
    docstring). The query source's parameters sit here under their checkpoint names (`query_embed`, `reference_boxes`,
    `query_selection`, ...; `query_sources.QuerySource.mount`); transformers calls the model's `_init_weights` on this
    module, which calls `reset_parameters` after the generic Linear init of its children."""

    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        d_model = config.d_model
        self.backbone = DetrCustomMultiScaleBackbone(config)
        self.input_proj = DetrCustomMultiScaleProjection(config, self.backbone.channels)
        self.position_embedding = build_position_embedding(config)
        if not hasattr(encoder_class(config), "encode_levels"):
            raise ValueError(f"encoder_type={config.encoder_type!r} has no `encode_levels`, the interface of encoders "
                             "with a multi-scale decoder (see encoder_detr.DetrCustomEncoder.encode_levels).")
        self.encoder = build_encoder(config, backbone_levels=len(self.backbone.channels))
        # RT-DETR's decoder_input_proj: each level again through a 1x1 conv + BatchNorm after the encoder
        self.decoder_input_proj = None
        if config.decoder_input_proj:
            self.decoder_input_proj = nn.ModuleList(projection(d_model, d_model, "batch")
                                                    for _ in range(config.num_feature_levels))
        # the registered query source (query_sources.py) as `self.query_source`, its parameters mounted here under
        # their checkpoint names; query groups 1..K-1 (Group DETR, training only, `query_groups.py`) are its own
        build_query_source(config, self)
        # the denoising queries' content: their noised labels' embeddings, the last row for padding slots
        self.denoising_class_embed = None
        if config.num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(config.num_labels + 1, d_model, padding_idx=config.num_labels)
        self.query_pos_head = MLP(4, 2 * d_model, d_model, num_layers=2)         # reference box -> query_pos
        self.decoder = build_decoder(config)
        # the registered heads in the decoder's layout (heads.py; per layer: the box heads refine inside the decoder)
        self.class_embed, self.bbox_embed = build_heads(config)
        self.config = config
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The inits that the model's generic `_init_weights` (xavier on every Linear) would otherwise undo: the
        deformable attention's direction grid and uniform weights, the class heads' prior, zero box deltas (each
        layer starts from its reference box, as Deformable DETR's refinement) and the query source's (the reference
        boxes, the selection heads' zero box deltas). Written with
        transformers' `initialization` functions, which leave alone what `from_pretrained` loaded."""
        for part in (self.decoder, self.encoder):   # the parts' own inits (e.g. deformable attention), if any
            if hasattr(part, "reset_parameters"):
                part.reset_parameters()
        for class_head in self.class_embed:
            init_class_head_bias_(class_head, self.config)
        for box_head in self.bbox_embed:
            init.zeros_(box_head.layers[-1].weight)
            init.zeros_(box_head.layers[-1].bias)
        if hasattr(self.query_source, "reset_parameters"):
            self.query_source.reset_parameters()

    def forward(
        self,
        pixel_values: torch.Tensor,            # [batch, channels, height, width]
        pixel_mask: torch.Tensor | None = None,   # [batch, height, width], 1 = real pixel; None = no padding
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool = True,              # taken for a call alike DetrCustomModel's: the output is a dataclass
        batch_independent: bool | None = None,
        labels: list[dict] | None = None,      # in training with num_denoising: the denoising queries' targets
    ) -> DetrCustomDeformableDetectorOutput:
        config = self.config
        if batch_independent or (batch_independent is None and getattr(config, "batch_independent_inference", False)):
            raise ValueError("batch_independent inference is not supported with a multi-scale decoder "
                             f"(decoder_type={config.decoder_type!r}) yet; pass batch_independent=False (and "
                             "config.batch_independent_inference=False).")
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        pixel_mask = check_pixel_inputs(pixel_values, pixel_mask, config.num_channels, next(self.parameters()).dtype)
        features = self.backbone(pixel_values)                        # per level [batch, channels, h, w]
        # under CPU autocast the backbone's maps may be bf16 (a convolution's output)
        bf16_features = features[0].device.type == "cpu" and torch.is_autocast_enabled("cpu")
        with fp32_on_cpu(pixel_values):                               # the rest in fp32 under CPU autocast
            if bf16_features:
                features = [feature.float() for feature in features]
            maps = self.input_proj(features)                          # per level [batch, d_model, h, w]
            masks = level_masks(pixel_mask, maps)                     # per level [batch, h, w], True = real
            ratios = valid_ratios(masks)                              # [batch, levels, 2]
            maps, encoder_states, encoder_attentions = self.encoder.encode_levels(
                maps, masks, ratios, self.position_embedding, output_attentions, output_hidden_states)
            if self.decoder_input_proj is not None:
                maps = [layer(level) for layer, level in zip(self.decoder_input_proj, maps)]
            memory, memory_mask, spatial_shapes = flatten_levels(maps, masks)   # [batch, sequence, d_model]
            # K = num_query_groups groups of matching queries in training, one in eval mode
            num_groups = self.config.num_query_groups if self.training else 1
            queries = self.query_source(memory, memory_mask, spatial_shapes, num_groups)   # [batch, K * queries, ..]
            query, reference, selected = queries.content, queries.reference, queries.proposals
            self_attn_mask = None
            if num_groups > 1:   # [K * queries] squared: each group sees itself only
                self_attn_mask = group_attention_mask(num_groups, self.config.num_queries, query.device)
            groups = None
            if self.training and labels is not None and self.denoising_class_embed is not None:
                config = self.config
                groups = denoising_groups(labels, self.denoising_class_embed, config.num_labels, config.num_queries,
                                          config.num_denoising, config.label_noise_ratio, config.box_noise_scale)
            if groups is not None:   # the denoising queries first, kept from the matching ones by the mask
                query = torch.cat([groups.content.to(query.dtype), query], 1)   # [batch, denoising + queries, d]
                reference = torch.cat([groups.reference.to(reference.dtype), reference], 1)
                self_attn_mask = groups.attn_mask if num_groups == 1 else with_denoising_mask(
                    groups.attn_mask, groups.num_queries, num_groups, self.config.num_queries)
            decoded = self.decoder(
                query, queries.position, reference, memory, spatial_shapes, valid_ratios=ratios,
                memory_mask=mask_if_padded(memory_mask), box_heads=self.bbox_embed,
                query_pos_head=self.query_pos_head, output_attentions=output_attentions,
                output_hidden_states=output_hidden_states, self_attn_mask=self_attn_mask)
            logits = torch.stack([head(states) for head, states in zip(self.class_embed, decoded.intermediate)])
            denoising, boxes = None, decoded.boxes
            if groups is not None:   # split off the denoising queries: everything else sees only the matching ones
                split = groups.num_queries
                denoising = {"logits": logits[:, :, :split], "pred_boxes": boxes[:, :, :split],
                             "indices": denoising_indices(groups, labels), "num_groups": groups.num_groups}
                logits, boxes = logits[:, :, split:], boxes[:, :, split:]
                decoded.intermediate = decoded.intermediate[:, :, split:]
                if decoded.hidden_states is not None:
                    decoded.hidden_states = tuple(states[:, split:] for states in decoded.hidden_states)
                if decoded.cross_attentions is not None:
                    decoded.cross_attentions = tuple(weights[:, split:] for weights in decoded.cross_attentions)
        return DetrCustomDeformableDetectorOutput(
            logits=logits, pred_boxes=boxes, last_hidden_state=decoded.intermediate[-1],
            intermediate_hidden_states=decoded.intermediate, encoder_last_hidden_state=memory,
            feature_mask=masks[len(self.backbone.channels) - 1], spatial_shapes=spatial_shapes,
            encoder_hidden_states=encoder_states,
            encoder_attentions=encoder_attentions, decoder_hidden_states=decoded.hidden_states,
            cross_attentions=decoded.cross_attentions, enc_logits=None if selected is None else selected.logits,
            enc_pred_boxes=None if selected is None else selected.pred_boxes, denoising=denoising)
