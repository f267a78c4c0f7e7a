"""Query groups: Group DETR's one-to-many training (Chen et al., ICCV 2023; 13 groups in LW-DETR and RF-DETR).

With `config.num_query_groups = K > 1`, the decoder runs K groups of `num_queries` object queries at training. Its
self-attention is masked block-diagonally, so a group never sees another (each is the 1-group decoder on its own
queries, with shared weights), every group is matched one-to-one to the targets on its own, and the loss is the
mean over groups of each group's DETR loss (on every decoder layer with `auxiliary_loss`). In eval mode only the
first group runs: outputs and inference cost are those of a 1-group model with the same weights.

Parameters: group 0 is the model's `query_embed` (same key and shape as without groups, so every checkpoint and
conversion is unchanged); groups 1..K-1 are `extra_query_embeds.0` .. `extra_query_embeds.{K-2}`, one
`nn.Embedding(num_queries, d_model)` each. The deformable decoder's queries also carry reference boxes: groups 1..K-1
have their own, `extra_reference_boxes.{i}` beside `reference_boxes`, or with query selection (`two_stage`) their own
selection heads, `extra_query_selections.{i}` beside `query_selection`, as LW-DETR's per-group two-stage heads (one
shared head would give every group the same proposals, hence the same queries). Denoising queries (`denoising.py`)
see the first group only, as they see the matching queries without groups (`with_denoising_mask`): with groups,
group 0 and the denoising queries compute what a 1-group model computes. A checkpoint with another number of groups
loads by key: groups it has are loaded, groups beyond the config's K are dropped (ignored unexpected keys), and groups
it lacks (fine-tuning a 1-group checkpoint with K = 13) start from its first group (`init_missing_groups_`).

The loss normalization follows LW-DETR's public code (`SetCriterion` with its default `sum_group_losses=False`:
`num_boxes * group_detr`), which averages the groups; summing instead would scale the loss (and the gradient
before clipping) by K. The criterion (`num_query_groups`) folds the K groups into the batch, K copies of each image,
and divides by K times the first group's normalizers: each term is the mean over groups of the 1-group term, one
matching pass per decoder layer for all groups.
"""
import re

import torch
from torch import nn

# the extra groups of a fine-tuned 1-group checkpoint start as its queries plus this much noise (relative to the
# queries' std): exact copies would give K identical groups, whose outputs, matches and gradients stay identical
# without dropout (the demo trains with dropout 0), so the extra groups would add nothing
GROUP_INIT_NOISE = 0.1

# each extra group's parameters by the first group's name: `extra_query_embeds.3.weight` -> `query_embed.weight`
FIRST_GROUP = {"extra_query_embeds": "query_embed", "extra_reference_boxes": "reference_boxes",
               "extra_query_selections": "query_selection"}
EXTRA_GROUP_KEY = re.compile(r"^(.*?)(" + "|".join(FIRST_GROUP) + r")\.\d+(.*)$")
# what a checkpoint with more groups than the config holds: dropped without a warning
EXTRA_GROUP_KEYS_TO_IGNORE = [rf"{name}\.\d+" for name in FIRST_GROUP]


def build_extra_query_embeds(config) -> nn.ModuleList:
    """Groups 1..K-1 (empty when `config.num_query_groups` is 1): one `[num_queries, d_model]` table each."""
    return nn.ModuleList(nn.Embedding(config.num_queries, config.d_model)
                         for _ in range(config.num_query_groups - 1))


def group_attention_mask(num_groups: int, num_queries: int, device=None) -> torch.Tensor:
    """`[K * Q, K * Q]` bool, True where a query may attend: within its own group (the block diagonal)."""
    group = torch.arange(num_groups * num_queries, device=device) // num_queries   # [K * Q], each query's group
    return group[:, None] == group[None, :]


def with_denoising_mask(denoising_mask: torch.Tensor, num_denoising: int, num_groups: int,
                        num_queries: int) -> torch.Tensor:
    """The self-attention mask of `num_denoising` denoising queries followed by K groups of matching queries,
    `[denoising + K * queries]` squared, True = may attend. `denoising_mask`: the 1-group one (`denoising.py`),
    `[denoising + queries]` squared. The denoising queries and the first group see what they see without groups
    (the denoising queries see the first group only); every group sees only itself."""
    size = num_denoising + num_groups * num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=denoising_mask.device)
    first = num_denoising + num_queries                      # the denoising queries and the first group
    mask[:first, :first] = denoising_mask
    mask[num_denoising:, num_denoising:] |= group_attention_mask(num_groups, num_queries, denoising_mask.device)
    return mask


@torch.no_grad()
def init_missing_groups_(model: nn.Module, missing_keys) -> list[str]:
    """After `from_pretrained`: every parameter of an extra group that the checkpoint lacked (its key in
    `missing_keys`) starts from the first group's loaded one, plus `GROUP_INIT_NOISE` noise relative to that
    tensor's std (drawn from torch's global generator; a constant tensor, such as a zero bias, is copied as is).
    Extra groups' names map to the first group's by `FIRST_GROUP`. Returns the keys initialized so."""
    parameters, done = dict(model.named_parameters()), []
    for key in sorted(missing_keys):   # a set: sorted, so that the noise draws do not depend on the hash seed
        match = EXTRA_GROUP_KEY.match(key)
        if match is None or key not in parameters:
            continue
        prefix, kind, rest = match.groups()
        first = parameters.get(prefix + FIRST_GROUP[kind] + rest)
        if first is None:
            continue
        noise = torch.randn_like(first) * (GROUP_INIT_NOISE * first.std()) if first.numel() > 1 else 0
        parameters[key].copy_(first + noise)
        done.append(key)
    return done
