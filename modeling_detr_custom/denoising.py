"""Denoising training (`config.num_denoising > 0`): DN-DETR's idea (Li et al. 2022) in DINO's contrastive form (Zhang
et al. 2023), as RT-DETR trains with it. Training only: eval mode, or a forward without labels, runs none of it.

Besides its matching queries, the deformable decoder gets groups of noised copies of the ground truth: each group
holds every target twice, a positive (its box moved by less than half its size, `box_noise_scale`) and a negative
(moved by between one and two halves: a near miss that must be rejected), and a fraction of the labels flipped
(`label_noise_ratio / 2`). A query's content is the embedding of its (noised) label, its reference the noised box. The
positives are assigned to their targets directly (no Hungarian matching) and learn to reconstruct them; the negatives
learn "no object". Groups = `num_denoising // most targets in an image` (at least 1), so a batch with few targets
gets more groups.

The self-attention mask keeps the answer from leaking: the matching queries never see a denoising query, and a group
never sees another group (it sees itself and the matching queries). So the matching queries' outputs are those of a
forward without denoising (tests/test_denoising.py checks that, and the groups against transformers'
`get_contrastive_denoising_training_group`, whose random draws these follow in the same order).
"""
from dataclasses import dataclass

import torch

from .blocks import inverse_sigmoid
from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh


@dataclass
class DenoisingGroups:
    """The denoising queries of one batch and what the loss needs to read their outputs."""

    content: torch.Tensor         # [batch, denoising, d_model], the noised labels' embeddings
    reference: torch.Tensor       # [batch, denoising, 4] cxcywh in [0, 1], the noised boxes
    attn_mask: torch.Tensor       # [denoising + queries, denoising + queries] bool, True = may attend
    positive_index: list          # per image: [targets * groups] int64, the positive queries, group after group
    num_groups: int

    @property
    def num_queries(self) -> int:
        return self.content.shape[1]


def denoising_groups(labels: list[dict], label_embed: torch.nn.Embedding, num_labels: int, num_queries: int,
                     num_denoising: int, label_noise_ratio: float, box_noise_scale: float) -> DenoisingGroups | None:
    """The contrastive denoising groups for `labels` (one dict per image, `class_labels` [n] and `boxes` [n, 4] cxcywh
    in [0, 1]); None when no image has a target. `label_embed`: `num_labels + 1` rows, the last (padding) for the slots
    of images with fewer targets than the most. Draws from torch's global generator."""
    counts = [len(target["class_labels"]) for target in labels]
    most = max(counts)
    if most == 0 or num_denoising <= 0:
        return None
    num_groups = max(1, num_denoising // most)
    batch, device = len(labels), label_embed.weight.device
    classes = torch.full((batch, most), num_labels, dtype=torch.int32, device=device)   # padding: num_labels
    boxes_cxcywh = torch.zeros(batch, most, 4, device=device)
    real = torch.zeros(batch, most, dtype=torch.bool, device=device)                     # not a padding slot
    for index, (target, count) in enumerate(zip(labels, counts)):
        classes[index, :count] = target["class_labels"].to(device)
        boxes_cxcywh[index, :count] = target["boxes"].to(device)
        real[index, :count] = True
    # each group: the targets as positives, then again as negatives
    repeats = 2 * num_groups
    classes, real = classes.repeat(1, repeats), real.repeat(1, repeats)         # [batch, denoising]
    boxes_cxcywh = boxes_cxcywh.repeat(1, repeats, 1)                            # [batch, denoising, 4]
    negative = torch.zeros(batch, 2 * most, 1, device=device)                    # [batch, 2 * most, 1]
    negative[:, most:] = 1
    negative = negative.repeat(1, num_groups, 1)                                 # [batch, denoising, 1]
    positive = (1 - negative[..., 0]).bool() & real                              # [batch, denoising]
    positive_index = [row.nonzero()[:, 0] for row in positive]                   # per image [count * groups]
    if label_noise_ratio > 0:
        flip = torch.rand_like(classes, dtype=torch.float) < label_noise_ratio * 0.5
        random_classes = torch.randint_like(flip, 0, num_labels, dtype=classes.dtype)
        classes = torch.where(flip & real, random_classes, classes)
    if box_noise_scale > 0:
        boxes_xyxy = box_cxcywh_to_xyxy(boxes_cxcywh)
        half_sizes = boxes_cxcywh[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale   # [batch, denoising, 4]
        signs = torch.randint_like(boxes_cxcywh, 0, 2) * 2.0 - 1.0
        # positives move by [0, 1) half-sizes, negatives by [1, 2)
        amounts = torch.rand_like(boxes_cxcywh) + negative
        boxes_xyxy = (boxes_xyxy + signs * amounts * half_sizes).clamp(0.0, 1.0)
        boxes_cxcywh = box_xyxy_to_cxcywh(boxes_xyxy)
    # the decoder takes references in [0, 1]: through inverse_sigmoid's clamp as RT-DETR's unactivated boxes
    reference = inverse_sigmoid(boxes_cxcywh).sigmoid()
    size = 2 * most * num_groups
    group = torch.arange(size + num_queries, device=device) // (2 * most)        # the matching queries: group >= G
    matching = group >= num_groups
    # a matching query sees the matching queries; a denoising query its own group and the matching queries
    attn_mask = (group[:, None] == group[None, :]) | matching[None, :]
    return DenoisingGroups(content=label_embed(classes), reference=reference, attn_mask=attn_mask,
                           positive_index=positive_index, num_groups=num_groups)


def denoising_indices(groups: DenoisingGroups, labels: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed assignment of the positive denoising queries to their targets: per image (query indices, target
    indices), target i of every group (RT-DETR's `get_cdn_matched_indices`)."""
    indices = []
    for positives, target in zip(groups.positive_index, labels):
        count = len(target["class_labels"])
        targets = torch.arange(count, dtype=torch.int64).repeat(groups.num_groups)
        assert len(positives) == len(targets)
        indices.append((positives.cpu(), targets))
    return indices
