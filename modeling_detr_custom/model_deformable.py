"""The multi-scale assembly (a decoder with `multi_scale = True` in `registry.py`, e.g. `decoder_type="deformable"`,
Deformable DETR's decoder, Zhu et al. 2021), one module that `DetrCustomForObjectDetection` holds as its `model`.

multi-scale features (`multiscale.py`) -> the registered encoder's `encode_levels` (`config.encoder_type`: "detr" on
the coarsest backbone level only, RT-DETR's AIFI, Zhao et al. 2024, the other levels passing through; "hybrid" the
same followed by RT-DETR's cross-scale fusion; "deformable" Deformable DETR's encoder over every level), with
`decoder_input_proj` RT-DETR's per-level conv + BatchNorm -> learned content queries with learned reference boxes
(DAB-DETR's anchors, kept in inverse-sigmoid space), or with `config.two_stage` the encoder's top proposals
(`query_selection.py`); in training the denoising groups (`denoising.py`) -> the registered decoder (the deformable
one's layers each refine the boxes with their own box head: iterative box refinement, stop-gradient between layers)
-> one class head per layer.

The heads sit here, not in `DetrCustomForObjectDetection`, because the refinement needs a box head inside every
layer; the output carries each layer's logits and boxes, which `DetrCustomForObjectDetection.forward` takes as they
are (the single-scale assembly's come from its own heads): one detection forward, loss and outputs for every variant.
"""
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .blocks import MLP, flatten_levels, fp32_on_cpu, inverse_sigmoid, mask_if_padded
from .class_head import class_head_outputs, init_class_head_bias_
from .configuration_detr_custom import DetrCustomConfig
from .denoising import denoising_groups, denoising_indices
from .inputs_detr_custom import check_pixel_inputs
from .multiscale import (DetrCustomMultiScaleBackbone, DetrCustomMultiScaleProjection, level_masks, projection,
                         valid_ratios)
from .position_encoding import build_position_embedding
from .query_groups import build_extra_query_embeds, group_attention_mask, with_denoising_mask
from .query_selection import DetrCustomQuerySelection, SelectedQueries
from .registry import build_decoder, build_encoder, encoder_class

# the learned reference boxes start with random centres over the image and this width and height
INITIAL_BOX_SIZE = 0.1


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
    docstring). Holds `reference_boxes` as its own parameter, so that transformers calls the model's `_init_weights`
    on it, which calls `reset_parameters` after the generic Linear init of its children."""

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
        two_stage = config.two_stage
        # the learned content queries (tgt); with query selection, only if learn_initial_query
        learned_query = not two_stage or config.learn_initial_query
        self.query_embed = nn.Embedding(config.num_queries, d_model) if learned_query else None
        # cxcywh, inverse sigmoid; with query selection the boxes come from the encoder's proposals
        self.reference_boxes = None if two_stage else nn.Parameter(torch.empty(config.num_queries, 4))
        self.query_selection = DetrCustomQuerySelection(config) if two_stage else None
        # query groups 1..K-1 (Group DETR, training only, `query_groups.py`): each group has its own content queries
        # (if learned), its own reference boxes or, with query selection, its own selection heads (LW-DETR's
        # per-group two-stage heads: shared heads would select the same proposals for every group)
        extra = config.num_query_groups - 1
        self.extra_query_embeds = build_extra_query_embeds(config) if learned_query else nn.ModuleList()
        self.extra_reference_boxes = nn.ParameterList(
            nn.Parameter(torch.empty(config.num_queries, 4)) for _ in range(0 if two_stage else extra))
        self.extra_query_selections = nn.ModuleList(
            DetrCustomQuerySelection(config) for _ in range(extra if two_stage else 0))
        # the denoising queries' content: their noised labels' embeddings, the last row for padding slots
        self.denoising_class_embed = None
        if config.num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(config.num_labels + 1, d_model, padding_idx=config.num_labels)
        self.query_pos_head = MLP(4, 2 * d_model, d_model, num_layers=2)         # reference box -> query_pos
        self.decoder = build_decoder(config)
        self.class_embed = nn.ModuleList(nn.Linear(d_model, class_head_outputs(config))
                                         for _ in range(config.decoder_layers))
        self.bbox_embed = nn.ModuleList(MLP(d_model, d_model, 4, num_layers=3) for _ in range(config.decoder_layers))
        for class_head in self.class_embed:
            class_head.is_class_head = True   # the model's _init_weights gives a newly built head the class prior
        self.config = config
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The inits that the model's generic `_init_weights` (xavier on every Linear) would otherwise undo: the
        deformable attention's direction grid and uniform weights, the class heads' prior, zero box deltas (each
        layer starts from its reference box, as Deformable DETR's refinement) and the reference boxes. Written with
        transformers' `initialization` functions, which leave alone what `from_pretrained` loaded."""
        for part in (self.decoder, self.encoder):   # the parts' own inits (e.g. deformable attention), if any
            if hasattr(part, "reset_parameters"):
                part.reset_parameters()
        for class_head in self.class_embed:
            init_class_head_bias_(class_head, self.config)
        for box_head in self.bbox_embed:
            init.zeros_(box_head.layers[-1].weight)
            init.zeros_(box_head.layers[-1].bias)
        for selection in [self.query_selection, *self.extra_query_selections]:
            if selection is not None:
                selection.reset_parameters()
        for boxes in [self.reference_boxes, *self.extra_reference_boxes]:
            if boxes is not None:
                centres = torch.rand(boxes.shape[0], 2)
                sizes = torch.full_like(centres, INITIAL_BOX_SIZE)
                init.copy_(boxes, inverse_sigmoid(torch.cat([centres, sizes], -1)))

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
            query, reference, selected = self._matching_queries(memory, memory_mask, spatial_shapes, num_groups)
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
                query, None, reference, memory, spatial_shapes, valid_ratios=ratios,
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

    def _matching_queries(self, memory: torch.Tensor, memory_mask: torch.Tensor, spatial_shapes, num_groups: int
                          ) -> tuple[torch.Tensor, torch.Tensor, SelectedQueries | None]:
        """The decoder's matching queries, `num_groups` groups of `num_queries`, group after group: content
        `[batch, K * queries, d_model]`, reference boxes `[batch, K * queries, 4]` (cxcywh in [0, 1]) and, with
        query selection, the groups' selected proposals (their logits and boxes concatenated the same way)."""
        def concat(tensors, dim=0):   # one group (eval mode) as it is: no copy on the inference path
            return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)

        batch, selected = memory.shape[0], None
        if self.query_selection is not None:
            selections = [self.query_selection, *self.extra_query_selections][:num_groups]
            per_group = [selection(memory, memory_mask, spatial_shapes) for selection in selections]
            selected = SelectedQueries(*(concat(fields, 1) for fields in zip(*(
                (group.content, group.reference, group.logits, group.pred_boxes) for group in per_group))))
            reference = selected.reference                                       # [batch, K * queries, 4], detached
        else:
            boxes = concat([self.reference_boxes, *self.extra_reference_boxes][:num_groups])   # [K * queries, 4]
            reference = boxes.sigmoid()[None].expand(batch, -1, -1)
        if self.query_embed is not None:
            embeds = [self.query_embed, *self.extra_query_embeds][:num_groups]
            query = concat([embed.weight for embed in embeds])[None].expand(batch, -1, -1)   # [batch, K * q, d]
        else:
            query = selected.content                                             # [batch, K * queries, d_model]
        return query, reference, selected
