"""Query selection (`config.two_stage`, the query source "two_stage", `TwoStageQueries`): the decoder's queries start
at the encoder's best proposals instead of at learned boxes, as two-stage Deformable DETR (Zhu et al. 2021, section
4.1) and RT-DETR (Zhao et al. 2024, section 4.3) do.

Every memory position (all levels, flattened) proposes one box: its cell's centre in the visible image, with width and
height `PROPOSAL_SIZE * 2 ** level` (Deformable DETR's and RT-DETR's anchors), kept in inverse-sigmoid space. Positions
on padding are never selected. A position whose proposal leaves [PROPOSAL_MARGIN, 1 - PROPOSAL_MARGIN] (the border
cells of a level more than 50 cells wide) has its memory zeroed and its proposal at +inf (the box saturates to the
image corner) but stays selectable, exactly as in Deformable DETR and RT-DETR, whose checkpoints were trained so
(excluding them changed a converted RT-DETRv2's outputs at 640 x 640). The memory goes through a Linear + LayerNorm
(`enc_output`), a class head scores it and a box head refines its proposal; the `num_queries` best-scoring positions
give the decoder's reference boxes and, unless `config.learn_initial_query`, its content queries (both detached:
RT-DETR's). The selected positions' logits and boxes get the set loss too (RT-DETR's encoder loss, `loss_*_enc`), so
the scores learn to rank proposals; with `classification_loss="varifocal"` the class target is the box's IoU, RT-DETR's
IoU-aware query selection.

Proposals are relative to each image's visible region, our box convention (docs/ARCHITECTURE.md), which is also
Deformable DETR's (`gen_encoder_output_proposals` divides by the visible cells); tests/test_query_selection.py checks
the proposals and the projected memory against transformers' implementation.
"""
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init

from .blocks import MLP
from .class_head import class_head_outputs
from .configuration_detr_custom import uses_sigmoid_classes
from .query_groups import build_extra_query_embeds
from .query_sources import Queries, QuerySource, concat_groups, group_embeddings

# proposal width and height at the finest level, doubled at each coarser one (Deformable DETR, RT-DETR's grid_size)
PROPOSAL_SIZE = 0.05
# proposals with a coordinate outside [margin, 1 - margin] are never selected (Deformable DETR's and RT-DETR's 0.01)
PROPOSAL_MARGIN = 0.01


def encoder_proposals(memory_mask: torch.Tensor, spatial_shapes, dtype=torch.float32):
    """One proposal box per memory position: (proposals [batch, sequence, 4] cxcywh in inverse-sigmoid space, +inf
    where not valid; valid [batch, sequence] bool). `memory_mask` [batch, sequence]: True = real pixel, levels
    flattened row-major, finest first; `spatial_shapes`: [levels] of (height, width)."""
    batch = memory_mask.shape[0]
    proposals, start = [], 0
    for level, (height, width) in enumerate(spatial_shapes):
        mask = memory_mask[:, start:start + height * width].view(batch, height, width)
        visible = torch.stack([mask[:, 0, :].sum(1), mask[:, :, 0].sum(1)], -1).to(dtype)   # [batch, 2] (w, h) cells
        rows, cols = torch.meshgrid(torch.arange(height, dtype=dtype, device=mask.device),
                                    torch.arange(width, dtype=dtype, device=mask.device), indexing="ij")
        centres = (torch.stack([cols, rows], -1)[None] + 0.5) / visible[:, None, None]       # [batch, h, w, 2]
        sizes = torch.full_like(centres, PROPOSAL_SIZE * 2.0 ** level)
        proposals.append(torch.cat([centres, sizes], -1).flatten(1, 2))                      # [batch, h * w, 4]
        start += height * width
    proposals = torch.cat(proposals, 1)                                                      # [batch, sequence, 4]
    valid = ((proposals > PROPOSAL_MARGIN) & (proposals < 1 - PROPOSAL_MARGIN)).all(-1) & memory_mask.bool()
    proposals = torch.log(proposals / (1 - proposals)).masked_fill(~valid[..., None], float("inf"))
    return proposals, valid


@dataclass
class SelectedQueries:
    """What [`DetrCustomQuerySelection`] gives the decoder (detached) and the loss (not detached)."""

    content: torch.Tensor     # [batch, queries, d_model], the selected positions' projected memory, detached
    reference: torch.Tensor   # [batch, queries, 4] cxcywh in [0, 1], the selected boxes, detached
    logits: torch.Tensor      # [batch, queries, classes], the encoder head's scores of the selected positions
    pred_boxes: torch.Tensor  # [batch, queries, 4] cxcywh in [0, 1], the same boxes with their gradient


class DetrCustomQuerySelection(nn.Module):
    """The encoder's proposals, scored and refined, and the top `num_queries` of them (see the module docstring).
    Names follow transformers' Deformable DETR / RT-DETR (`enc_output`, `enc_output_norm`, `enc_score_head`,
    `enc_bbox_head`)."""

    def __init__(self, config):
        super().__init__()
        d_model = config.d_model
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_score_head = nn.Linear(d_model, class_head_outputs(config))
        self.enc_score_head.is_class_head = True   # the model's _init_weights gives it the class prior
        self.enc_bbox_head = MLP(d_model, d_model, 4, num_layers=3)
        self.num_queries = config.num_queries
        self.sigmoid = uses_sigmoid_classes(config)

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor, spatial_shapes) -> SelectedQueries:
        """`memory` [batch, sequence, d_model]; `memory_mask` [batch, sequence], True = real pixel."""
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"query selection (two_stage) picks num_queries={self.num_queries} of the encoder's "
                             f"{memory.shape[1]} positions {list(spatial_shapes)}: the images are too small for it. "
                             "Use larger images or fewer queries.")
        proposals, valid = encoder_proposals(memory_mask, spatial_shapes, memory.dtype)   # [batch, sequence, 4]
        memory = memory.masked_fill(~valid[..., None], 0)                     # padding and border positions
        features = self.enc_output_norm(self.enc_output(memory))
        logits = self.enc_score_head(features)                                # [batch, sequence, classes]
        with torch.no_grad():
            scores = logits.max(-1).values if self.sigmoid else logits.softmax(-1)[..., :-1].max(-1).values
            # padding never; positions outside the margin may be chosen (see the module docstring)
            index = scores.masked_fill(~memory_mask.bool(), float("-inf")).topk(self.num_queries, dim=1).indices

        def take(tensor):   # [batch, sequence, channels] -> [batch, queries, channels]
            return tensor.gather(1, index[..., None].expand(-1, -1, tensor.shape[-1]))

        # the box head on the selected positions only (RT-DETR runs it on all, then takes the same rows)
        selected_features = take(features)                                    # [batch, queries, d_model]
        boxes = (self.enc_bbox_head(selected_features) + take(proposals)).sigmoid()   # [batch, queries, 4]
        return SelectedQueries(content=selected_features.detach(), reference=boxes.detach(), logits=take(logits),
                               pred_boxes=boxes)

    @torch.no_grad()
    def reset_parameters(self):
        """Zero box deltas at the start: each selected box is its proposal (RT-DETR's init of `enc_bbox_head`)."""
        init.zeros_(self.enc_bbox_head.layers[-1].weight)
        init.zeros_(self.enc_bbox_head.layers[-1].bias)


class TwoStageQueries(QuerySource):
    """Query source "two_stage" (`query_sources.py`'s contract): the top `num_queries` proposals of
    `query_selection` give the reference boxes and the content queries (or, with `learn_initial_query`, learned
    content queries `query_embed`); each extra query group has its own selection heads (`extra_query_selections`,
    LW-DETR's: shared heads would select the same proposals for every group). The selected proposals' logits and
    boxes go to the loss (`Queries.proposals`)."""

    multi_scale = True

    def __init__(self, config):
        super().__init__()
        self.register_module("query_embed", nn.Embedding(config.num_queries, config.d_model)
                             if config.learn_initial_query else None)   # None: model.query_embed is None
        self.register_parameter("reference_boxes", None)   # the boxes come from the proposals: None
        self.query_selection = DetrCustomQuerySelection(config)
        self.extra_query_embeds = build_extra_query_embeds(config) if config.learn_initial_query else nn.ModuleList()
        self.extra_query_selections = nn.ModuleList(
            DetrCustomQuerySelection(config) for _ in range(config.num_query_groups - 1))

    @torch.no_grad()
    def reset_parameters(self):
        for selection in [self.query_selection, *self.extra_query_selections]:
            selection.reset_parameters()

    def forward(self, memory, memory_mask, spatial_shapes, num_groups: int) -> Queries:
        selections = [self.query_selection, *self.extra_query_selections][:num_groups]
        per_group = [selection(memory, memory_mask, spatial_shapes) for selection in selections]
        selected = SelectedQueries(*(concat_groups(fields, 1) for fields in zip(*(
            (group.content, group.reference, group.logits, group.pred_boxes) for group in per_group))))
        content = selected.content                                             # [batch, K * queries, d_model]
        if self.query_embed is not None:
            content = group_embeddings(self.query_embed, self.extra_query_embeds, num_groups, memory.shape[0])
        return Queries(content=content, reference=selected.reference, proposals=selected)   # reference detached
