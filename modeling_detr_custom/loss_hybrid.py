"""Criterion "hybrid" (`config.criterion`): H-DETR's hybrid matching (Jia et al., CVPR 2023), one-to-one and
one-to-many supervision in one training step, on the query groups we already have (`query_groups.py`).

With `num_query_groups = K >= 2`, the first group of `num_queries` queries is matched one-to-one to the targets (the
DETR loss `DetrCustomLoss` gives it, denoising terms included): it is the group that runs at inference. The other
K - 1 groups together form one set of (K - 1) x `num_queries` queries matched one-to-many: to the targets repeated
`one_to_many_repeats` times (H-DETR's k, 6 in the paper), so every object is claimed by several queries and each
training image supervises many more of them, the dense supervision that CNN detectors get from their anchors. An
image whose repeated targets would outnumber that set is repeated as often as it fits (at least once). The
one-to-many terms are normalized by their own matched-target count (each set's term is a mean over its own targets,
as H-DETR's) and added to the one-to-one loss with weight 1 (H-DETR's lambda), logged with the suffix `_o2m`. The
block-diagonal attention mask of the groups keeps the one-to-many queries from informing the first group, so
inference (the first group alone) computes what it computes without them. With one group (eval mode) this is the
plain DETR loss.
"""
import torch

from .loss_detr_custom import DetrCustomLoss

O2M_SUFFIX = "_o2m"


def repeat_targets(labels: list[dict], repeats: int, num_queries: int) -> list[dict]:
    """Each image's targets repeated `repeats` times, or as often as `num_queries` allows (at least once)."""
    repeated = []
    for target in labels:
        count = len(target["class_labels"])
        times = max(1, min(repeats, num_queries // count)) if count else 1
        repeated.append({**target, "class_labels": target["class_labels"].repeat(times),
                         "boxes": target["boxes"].repeat(times, 1)})
    return repeated


class HybridMatchingLoss(DetrCustomLoss):
    """The one-to-one DETR loss on the first query group plus the one-to-many loss on the others (module docstring).
    Reads `config.one_to_many_repeats`; needs `config.num_query_groups >= 2` (the config's rules check both)."""

    config_fields = ("one_to_many_repeats",)

    def __init__(self, config):
        super().__init__(config)
        self.one_to_many_repeats = int(config.one_to_many_repeats)

    def forward(self, logits, pred_boxes, labels, auxiliary_outputs=None, labels_checked: bool = False,
                encoder_outputs: dict | None = None, denoising_outputs: dict | None = None,
                num_query_groups: int = 1) -> tuple[torch.Tensor, dict]:
        """As `DetrCustomLoss.forward`; with `num_query_groups` K >= 2 the first group is matched one-to-one and the
        other K - 1 groups, as one set, one-to-many."""
        if num_query_groups == 1:
            return super().forward(logits, pred_boxes, labels, auxiliary_outputs, labels_checked, encoder_outputs,
                                   denoising_outputs)
        if not labels_checked:
            labels = self.label_tensors(labels, logits.device)
            self.check_labels(labels, batch=logits.shape[0])
        queries = logits.shape[1] // num_query_groups

        def split(outputs: dict | None):   # (first group, the other groups) of {"logits", "pred_boxes"}
            if outputs is None:
                return None, None
            return ({name: value[:, :queries] for name, value in outputs.items()},
                    {name: value[:, queries:] for name, value in outputs.items()})

        first, rest = split({"logits": logits, "pred_boxes": pred_boxes})
        layers = [split(layer) for layer in auxiliary_outputs or []]
        encoder_first, encoder_rest = split(encoder_outputs)
        one_to_one, terms = super().forward(first["logits"], first["pred_boxes"], labels,
                                            [layer[0] for layer in layers], True, encoder_first, denoising_outputs)
        repeated = repeat_targets(labels, self.one_to_many_repeats, rest["logits"].shape[1])
        one_to_many, many_terms = super().forward(rest["logits"], rest["pred_boxes"], repeated,
                                                  [layer[1] for layer in layers], True, encoder_rest)
        terms.update({name + O2M_SUFFIX: value for name, value in many_terms.items()})
        return one_to_one + one_to_many, terms
