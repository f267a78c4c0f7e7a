"""Query groups: Group DETR's one-to-many training (Chen et al., ICCV 2023; 13 groups in LW-DETR and RF-DETR).

With `config.num_query_groups = K > 1`, the decoder runs K groups of `num_queries` object queries at training. Its
self-attention is masked block-diagonally, so a group never sees another (each is the 1-group decoder on its own
queries, with shared weights), every group is matched one-to-one to the targets on its own, and the loss is the
mean over groups of each group's DETR loss (on every decoder layer with `auxiliary_loss`). In eval mode only the
first group runs: outputs and inference cost are those of a 1-group model with the same weights.

Parameters: group 0 is the model's `query_embed` (same key and shape as without groups, so every checkpoint and
conversion is unchanged); groups 1..K-1 are `extra_query_embeds.0` .. `extra_query_embeds.{K-2}`, one
`nn.Embedding(num_queries, d_model)` each. A checkpoint with another number of groups therefore loads by key:
groups it has are loaded, groups beyond the config's K are dropped (ignored unexpected keys), and groups it lacks
(fine-tuning a 1-group checkpoint with K = 13) start from its first group (`init_missing_groups_`).

The loss normalization follows LW-DETR's public code (`SetCriterion` with its default `sum_group_losses=False`:
`num_boxes * group_detr`), which averages the groups; summing instead would scale the loss (and the gradient
before clipping) by K. Here the K groups are folded into the batch, K copies of each image, and the loss is called
once: its normalizers (matched boxes, class weights, summed over the batch) then grow by K, so each term is the
mean over groups of the 1-group term, one matching pass per decoder layer for all groups.
"""
import torch
from torch import nn

# the extra groups of a fine-tuned 1-group checkpoint start as its queries plus this much noise (relative to the
# queries' std): exact copies would give K identical groups, whose outputs, matches and gradients stay identical
# without dropout (the demo trains with dropout 0), so the extra groups would add nothing
GROUP_INIT_NOISE = 0.1


def build_extra_query_embeds(config) -> nn.ModuleList:
    """Groups 1..K-1 (empty when `config.num_query_groups` is 1): one `[num_queries, d_model]` table each."""
    return nn.ModuleList(nn.Embedding(config.num_queries, config.d_model)
                         for _ in range(config.num_query_groups - 1))


def group_attention_mask(num_groups: int, num_queries: int, device=None) -> torch.Tensor:
    """`[K * Q, K * Q]` bool, True where a query may attend: within its own group (the block diagonal)."""
    group = torch.arange(num_groups * num_queries, device=device) // num_queries   # [K * Q], each query's group
    return group[:, None] == group[None, :]


def object_queries(query_embed: nn.Embedding, extra_query_embeds: nn.ModuleList, training: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The decoder's queries and self-attention mask. One group (eval mode, or `num_query_groups` 1): the
    `query_embed` table `[num_queries, d_model]` and no mask. In training with K groups: all groups' queries, group
    after group, `[K * num_queries, d_model]`, and the mask that keeps them apart, `[K * num_queries]` squared."""
    if not training or len(extra_query_embeds) == 0:
        return query_embed.weight, None
    query_pos = torch.cat([query_embed.weight] + [embed.weight for embed in extra_query_embeds])
    mask = group_attention_mask(1 + len(extra_query_embeds), query_embed.num_embeddings, query_pos.device)
    return query_pos, mask


def fold_groups(tensor: torch.Tensor, num_groups: int) -> torch.Tensor:
    """`[batch, K * Q, ...]` -> `[K * batch, Q, ...]`, group-major: rows g * batch .. (g + 1) * batch - 1 hold group
    g of every image, so the labels of the folded batch are `labels * K`."""
    return tensor.unflatten(1, (num_groups, -1)).transpose(0, 1).flatten(0, 1)


def grouped_loss(criterion, logits: torch.Tensor, pred_boxes: torch.Tensor, labels: list[dict],
                 auxiliary_outputs: list[dict] | None, num_groups: int) -> tuple[torch.Tensor, dict]:
    """The set-prediction loss of K query groups, each matched one-to-one to the labels on its own: the mean over
    groups of `criterion`'s 1-group loss, every term of the loss dict likewise (under the usual names, so that
    training logs compare with 1-group runs). `logits` / `pred_boxes`: `[batch, K * Q, ...]`, groups in order; the
    labels were checked by the model. With one group this is the criterion's call, unchanged."""
    if num_groups == 1:
        return criterion(logits, pred_boxes, labels, auxiliary_outputs, labels_checked=True)
    if auxiliary_outputs is not None:
        auxiliary_outputs = [{name: fold_groups(value, num_groups) for name, value in layer.items()}
                             for layer in auxiliary_outputs]
    return criterion(fold_groups(logits, num_groups), fold_groups(pred_boxes, num_groups), list(labels) * num_groups,
                     auxiliary_outputs, labels_checked=True)


@torch.no_grad()
def init_missing_groups_(model: nn.Module, missing_keys) -> list[str]:
    """After `from_pretrained`: every extra group the checkpoint lacked (its key in `missing_keys`) starts from the
    first group's loaded queries, plus `GROUP_INIT_NOISE` relative noise (drawn from torch's global generator).
    Returns the keys initialized so."""
    missing, done = set(missing_keys), []
    for name, module in model.named_modules():
        extra = getattr(module, "extra_query_embeds", None)
        if not isinstance(extra, nn.ModuleList) or not isinstance(getattr(module, "query_embed", None), nn.Embedding):
            continue
        first = module.query_embed.weight                              # [num_queries, d_model]
        for index, embed in enumerate(extra):
            key = f"{name}.extra_query_embeds.{index}.weight" if name else f"extra_query_embeds.{index}.weight"
            if key in missing:
                noise = torch.randn_like(first) * (GROUP_INIT_NOISE * first.std())
                embed.weight.copy_(first + noise)
                done.append(key)
    return done
