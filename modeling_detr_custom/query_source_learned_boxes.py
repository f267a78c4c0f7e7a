"""Query source "learned_boxes", for a multi-scale decoder: learned content queries with learned reference boxes, as
Deformable DETR's decoder with DAB-DETR's anchors (Liu et al. 2022) takes them; the boxes are kept in
inverse-sigmoid space and refined by every decoder layer.

Parameters: `query_embed` `[num_queries, d_model]` and `reference_boxes` `[num_queries, 4]` (cxcywh, inverse
sigmoid) and, with K query groups (Group DETR, `query_groups.py`), each extra group's own, `extra_query_embeds.<i>`
and `extra_reference_boxes.<i>`. The contract is `query_sources.py`'s.
"""
import torch
from torch import nn
from transformers import initialization as init

from .blocks import inverse_sigmoid
from .query_groups import build_extra_query_embeds
from .query_sources import Queries, QuerySource, concat_groups, group_embeddings

# the learned reference boxes start with random centres over the image and this width and height
INITIAL_BOX_SIZE = 0.1


class LearnedBoxQueries(QuerySource):
    """Learned content queries (`query_embed`) with learned reference boxes (`reference_boxes`), each extra query
    group with its own of both."""

    multi_scale = True

    def __init__(self, config):
        super().__init__()
        self.query_embed = nn.Embedding(config.num_queries, config.d_model)
        self.reference_boxes = nn.Parameter(torch.empty(config.num_queries, 4))
        self.extra_query_embeds = build_extra_query_embeds(config)
        self.extra_reference_boxes = nn.ParameterList(
            nn.Parameter(torch.empty(config.num_queries, 4)) for _ in range(config.num_query_groups - 1))
        self.register_module("query_selection", None)   # the two-stage source's, None here (model.query_selection)

    @torch.no_grad()
    def reset_parameters(self):
        """Random centres over the image, `INITIAL_BOX_SIZE` wide and high (transformers' `initialization`
        functions leave alone what `from_pretrained` loaded)."""
        for boxes in [self.reference_boxes, *self.extra_reference_boxes]:
            centres = torch.rand(boxes.shape[0], 2)
            sizes = torch.full_like(centres, INITIAL_BOX_SIZE)
            init.copy_(boxes, inverse_sigmoid(torch.cat([centres, sizes], -1)))

    def forward(self, memory, memory_mask, spatial_shapes, num_groups: int) -> Queries:
        batch = memory.shape[0]
        boxes = concat_groups([self.reference_boxes, *self.extra_reference_boxes][:num_groups])   # [K * q, 4]
        return Queries(content=group_embeddings(self.query_embed, self.extra_query_embeds, num_groups, batch),
                       reference=boxes.sigmoid()[None].expand(batch, -1, -1))
