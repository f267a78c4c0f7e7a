"""Query source "learned" (DETR, Carion et al. 2020): `num_queries` learned object queries, the single-scale
decoder's query positions (its content starts at zero; in the paper's names the queries are `query_pos`).

Parameters: `query_embed` `[num_queries, d_model]` and, with K query groups (Group DETR, `query_groups.py`), one
table per extra group, `extra_query_embeds.<i>`, used in training only. The contract is `query_sources.py`'s.
"""
from torch import nn

from .query_groups import build_extra_query_embeds
from .query_sources import Queries, QuerySource, group_embeddings


class LearnedQueries(QuerySource):
    """DETR's object queries: `query_embed` (and `extra_query_embeds`), the decoder's query positions."""

    multi_scale = False

    def __init__(self, config):
        super().__init__()
        self.query_embed = nn.Embedding(config.num_queries, config.d_model)   # the learned object queries
        self.extra_query_embeds = build_extra_query_embeds(config)   # query groups 1..K-1, used in training only

    def forward(self, memory, memory_mask, spatial_shapes, num_groups: int) -> Queries:
        return Queries(position=group_embeddings(self.query_embed, self.extra_query_embeds, num_groups,
                                                 memory.shape[0]))
