"""DETR's set-prediction loss as a table of terms, like DETR's `loss_map`: the class term chosen by
`config.classification_loss` (`CLASS_TERMS`: softmax cross-entropy `loss_ce`, DETR's; sigmoid focal `loss_focal`,
Deformable DETR's; varifocal `loss_vfl`, RT-DETR's), each declaring the head it needs and its matching cost; the box
terms (`BOX_TERMS`: L1 `loss_bbox`, GIoU `loss_giou`); and the sets of outputs they run on (`TERM_SETS`: the last
decoder layer, the auxiliary layers, the encoder's proposals, the denoising queries). The matcher is in
`matcher_detr_custom.py`.

Called explicitly by `DetrCustomForObjectDetection` (never through transformers' `loss_function`, which picks a
loss by class name and normalizes `num_boxes` differently across processes, see docs/ARCHITECTURE.md).
"""
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import fold_groups
from .box_ops import box_cxcywh_to_xyxy, elementwise_box_iou, elementwise_generalized_box_iou
from .configuration_detr_custom import DetrCustomConfig
from .matcher_detr_custom import HungarianMatcher, focal_matching_cost, pad_targets

__all__ = ["CLASS_TERMS", "BOX_TERMS", "TERM_SETS", "ClassTerm", "DetrCustomLoss", "HungarianMatcher",
           "focal_matching_cost", "pad_targets", "sigmoid_focal_loss", "varifocal_loss"]

BOX_TOLERANCE = 1e-4   # normalized boxes may overshoot [0, 1] by float rounding, not more


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Elementwise focal loss (Lin et al. 2017) of per-class sigmoid logits against 0 / 1 targets, same shape:
    alpha_t (1 - p_t)^gamma BCE(logits, targets). Matches Deformable DETR's models/segmentation.py
    sigmoid_focal_loss before its reduction."""
    probs = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * bce


def varifocal_loss(logits: torch.Tensor, target_scores: torch.Tensor, positives: torch.Tensor, alpha: float,
                   gamma: float) -> torch.Tensor:
    """Elementwise varifocal loss (Zhang et al. 2021) as RT-DETR's loss_labels_vfl: BCE against `target_scores` (the
    IoU at a matched query's class, 0 elsewhere), weighted by the target score on `positives` (1 there, 0 elsewhere)
    and by alpha p^gamma (p detached) on the negatives."""
    weight = alpha * logits.detach().sigmoid() ** gamma * (1 - positives) + target_scores
    return F.binary_cross_entropy_with_logits(logits, target_scores, weight=weight, reduction="none")


@dataclass
class Matched:
    """One output set's matched pairs, what every term reads."""

    batch_idx: torch.Tensor       # [num_matched] image of each matched query
    query_idx: torch.Tensor       # [num_matched]
    classes: torch.Tensor         # [num_matched] the target's class
    boxes: torch.Tensor           # [num_matched, 4] the predicted boxes, cxcywh
    target_boxes: torch.Tensor    # [num_matched, 4]


def cross_entropy_term(criterion, logits, matched: Matched, num_boxes: float, class_weight_sum: float):
    """Softmax cross-entropy over num_labels + 1 classes, unmatched queries target "no object" (weighted by
    `eos_coefficient`), summed / the class weights' sum (DETR's weighted mean, normalized across processes)."""
    target_classes = torch.full(logits.shape[:2], criterion.num_labels, dtype=torch.int64, device=logits.device)
    target_classes[matched.batch_idx, matched.query_idx] = matched.classes    # [batch, queries]
    class_weight = torch.ones(criterion.num_labels + 1, device=logits.device)
    class_weight[-1] = criterion.eos_coefficient
    loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, class_weight, reduction="sum")
    return loss_ce / class_weight_sum


def _positives(logits, matched: Matched) -> torch.Tensor:
    positives = torch.zeros_like(logits)                            # [batch, queries, num_labels]
    positives[matched.batch_idx, matched.query_idx, matched.classes] = 1.0
    return positives


def focal_term(criterion, logits, matched: Matched, num_boxes: float, class_weight_sum: float):
    """Sigmoid focal loss over `[batch, queries, num_labels]`, summed / num_boxes (Deformable DETR's normalization:
    its mean over queries times the number of queries)."""
    loss = sigmoid_focal_loss(logits, _positives(logits, matched), criterion.focal_alpha, criterion.focal_gamma)
    return loss.sum() / num_boxes


def varifocal_term(criterion, logits, matched: Matched, num_boxes: float, class_weight_sum: float):
    """Varifocal loss with the matched box's IoU as the target score (RT-DETR's), summed / num_boxes."""
    with torch.no_grad():   # the target is the box's quality, not something to optimize through
        iou = elementwise_box_iou(box_cxcywh_to_xyxy(matched.boxes), box_cxcywh_to_xyxy(matched.target_boxes))
    target_scores = torch.zeros_like(logits)
    target_scores[matched.batch_idx, matched.query_idx, matched.classes] = iou.to(logits.dtype)
    loss = varifocal_loss(logits, target_scores, _positives(logits, matched), criterion.varifocal_alpha,
                          criterion.focal_gamma)
    return loss.sum() / num_boxes


def l1_term(matched: Matched, num_boxes: float):
    return F.l1_loss(matched.boxes, matched.target_boxes, reduction="none").sum() / num_boxes


def giou_term(matched: Matched, num_boxes: float):
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(matched.boxes),
                                           box_cxcywh_to_xyxy(matched.target_boxes))    # [num_matched]
    return (1 - giou).sum() / num_boxes


@dataclass(frozen=True)
class ClassTerm:
    """A class term: its logged name, the head it needs (`"softmax"`: num_labels + 1 logits, the last "no object";
    `"sigmoid"`: num_labels per-class logits, see `class_head.py`), the matcher's class cost that goes with it
    (`"probability"`: -p(class) under the softmax; `"focal"`: the focal cost of the sigmoid) and its function
    `(criterion, logits, matched, num_boxes, class_weight_sum) -> scalar`."""

    name: str
    head: str
    matching_cost: str
    function: Callable


# config.classification_loss -> its class term; the weight of each is config.class_loss_coefficient
CLASS_TERMS = {
    "cross_entropy": ClassTerm("loss_ce", "softmax", "probability", cross_entropy_term),   # DETR (the published name)
    "focal": ClassTerm("loss_focal", "sigmoid", "focal", focal_term),                      # Deformable DETR
    "varifocal": ClassTerm("loss_vfl", "sigmoid", "focal", varifocal_term),                # RT-DETR
}
# the box terms on the matched pairs: name -> (function, the config field of its weight)
BOX_TERMS = {"loss_bbox": (l1_term, "bbox_loss_coefficient"), "loss_giou": (giou_term, "giou_loss_coefficient")}
# the sets of outputs every term runs on, with the suffix of their logged names: the last decoder layer; the layers
# before it (config.auxiliary_loss); the encoder's selected proposals (two-stage); the denoising queries of every
# layer (their fixed assignment, normalized by num_boxes x the number of denoising groups). Each weighs as the last
# layer's term of the same name
TERM_SETS = {"decoder": "", "auxiliary": "_{layer}", "encoder": "_enc", "denoising": "_dn_{layer}"}


class DetrCustomLoss(nn.Module):
    """DETR's set-prediction loss: Hungarian matching, then the class term and L1 and GIoU on matched boxes (the
    table above), on every set of outputs in `TERM_SETS`. The class term is `CLASS_TERMS[config.classification_loss]`:
    cross-entropy with "no object" weighted by `eos_coefficient` (DETR, `loss_ce`), or over the num_labels sigmoid
    logits the focal loss (Deformable DETR, `loss_focal`) or the varifocal loss with the matched box's IoU as target
    (RT-DETR, `loss_vfl`), each summed over queries and classes and divided by `num_boxes`; the matcher uses the
    class cost the term declares.

    Box losses are divided by `num_boxes`: matched targets summed over all processes / number of processes
    (at least 1), as in the original. The cross-entropy is a weighted mean whose denominator (the sum of class
    weights: 1 per matched query, `eos_coefficient` per other query) is normalized the same way; on one process
    this is exactly the original's `F.cross_entropy(..., weight)`, and on N processes it makes the averaged loss
    equal to the single-process loss of the same global batch (the original's per-process mean does not).
    """

    def __init__(self, config):
        super().__init__()
        self.classification_loss = getattr(config, "classification_loss", "cross_entropy")
        self.class_term = CLASS_TERMS[self.classification_loss]
        self.sigmoid = self.class_term.head == "sigmoid"
        # a transformers DetrConfig (or a config saved before these fields) works too: the fields' defaults apply
        for name in ("focal_alpha", "focal_gamma", "varifocal_alpha", "class_loss_coefficient"):
            setattr(self, name, getattr(config, name, getattr(DetrCustomConfig, name)))
        focal_cost = self.class_term.matching_cost == "focal"
        self.matcher = HungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost,
                                        focal_alpha=self.focal_alpha if focal_cost else None,
                                        focal_gamma=self.focal_gamma)
        self.num_labels = config.num_labels
        self.eos_coefficient = config.eos_coefficient
        # each term's weight, by the term's own name
        self.weights = {self.class_term.name: self.class_loss_coefficient,
                        **{name: getattr(config, field) for name, (_, field) in BOX_TERMS.items()}}

    def forward(self, logits, pred_boxes, labels, auxiliary_outputs=None, labels_checked: bool = False,
                encoder_outputs: dict | None = None, denoising_outputs: dict | None = None,
                num_query_groups: int = 1) -> tuple[torch.Tensor, dict]:
        """Returns (total weighted loss, dict of unweighted terms). `auxiliary_outputs`: list of
        `{"logits", "pred_boxes"}` for the decoder layers before the last (terms `loss_ce_0`, ...).
        `encoder_outputs`: `{"logits", "pred_boxes"}` of the encoder's selected proposals (query selection; terms
        `loss_ce_enc`, ..., weighted as the others, as RT-DETR). `denoising_outputs`: `{"logits", "pred_boxes"}`
        `[decoder_layers, batch, denoising, ...]` of the denoising queries, with `indices` (their fixed assignment,
        `denoising.denoising_indices`) and `num_groups`: every layer's terms `loss_ce_dn_0`, ..., normalized by
        num_boxes x num_groups, as RT-DETR. `labels_checked`: the caller already ran `check_labels` (the model does,
        before its forward). (`loss_ce` stands for the class term's name: `loss_focal` / `loss_vfl` with a sigmoid
        head.)

        `num_query_groups` K > 1 (Group DETR, `query_groups.py`): the matching outputs (`logits`, `pred_boxes`, the
        auxiliary and encoder outputs) hold K groups of queries, `[batch, K * queries, ...]`, each matched to the
        labels on its own. They are folded into the batch (K copies of each image), so one matching pass per layer
        serves every group, and normalized by K times the first group's normalizers: each term is the mean over
        groups of the 1-group term (LW-DETR's `num_boxes * group_detr`). The denoising terms keep the 1-group
        normalizers and labels: they are the terms a 1-group model with the same outputs gets."""
        batch = logits.shape[0]
        if not labels_checked:
            labels = self.label_tensors(labels, logits.device)
            self.check_labels(labels, batch=batch)
        num_boxes, class_weight_sum = self._normalizers(logits[:, :logits.shape[1] // num_query_groups], labels)
        targets = self._targets(labels, logits.device)   # gathered once for every decoder layer
        # the matching outputs with K groups folded into the batch, and their labels and normalizers
        matching_labels, matching_targets = labels, targets
        matching_boxes, matching_weights = num_boxes, class_weight_sum
        if num_query_groups > 1:
            logits, pred_boxes = fold_groups(logits, num_query_groups), fold_groups(pred_boxes, num_query_groups)
            auxiliary_outputs = [{name: fold_groups(value, num_query_groups) for name, value in layer.items()}
                                 for layer in auxiliary_outputs or []]
            if encoder_outputs is not None:
                encoder_outputs = {name: fold_groups(value, num_query_groups)
                                   for name, value in encoder_outputs.items()}
            matching_labels = list(labels) * num_query_groups
            matching_targets = self._targets(matching_labels, logits.device)
            matching_boxes, matching_weights = num_boxes * num_query_groups, class_weight_sum * num_query_groups
        matching = (matching_labels, matching_targets, matching_boxes, matching_weights)
        # TERM_SETS, in order: (suffix, logits, pred_boxes, the labels and normalizers, fixed indices, log)
        sets = [(TERM_SETS["decoder"], logits, pred_boxes, matching, None, True)]
        sets += [(TERM_SETS["auxiliary"].format(layer=layer), aux["logits"], aux["pred_boxes"], matching, None, False)
                 for layer, aux in enumerate(auxiliary_outputs or [])]
        if encoder_outputs is not None:
            sets.append((TERM_SETS["encoder"], encoder_outputs["logits"], encoder_outputs["pred_boxes"], matching,
                         None, False))
        if denoising_outputs is not None:
            single = (labels, targets, num_boxes * denoising_outputs["num_groups"], class_weight_sum)
            sets += [(TERM_SETS["denoising"].format(layer=layer), layer_logits, layer_boxes, single,
                      denoising_outputs["indices"], False)
                     for layer, (layer_logits, layer_boxes) in enumerate(zip(denoising_outputs["logits"],
                                                                             denoising_outputs["pred_boxes"]))]
        loss_dict, weighted = {}, []
        for suffix, set_logits, set_boxes, (set_labels, set_targets, boxes, weights), indices, log in sets:
            terms = self._layer_losses(set_logits, set_boxes, set_labels, set_targets, boxes, weights, log, indices)
            for name, value in terms.items():
                loss_dict[name + suffix] = value
                if name in self.weights:
                    weighted.append(value * self.weights[name])
        return sum(weighted), loss_dict

    @staticmethod
    def _targets(labels: list[dict], device) -> dict:
        """The targets of a batch in the forms the matcher and the terms read."""
        return {
            "padded": pad_targets(labels),
            "classes": torch.cat([target["class_labels"] for target in labels]).to(device),         # [num_targets]
            "boxes": torch.cat([target["boxes"] for target in labels]).to(device).float(),          # [num_targets, 4]
            "offsets": [0] + list(itertools.accumulate(len(target["class_labels"]) for target in labels))[:-1],
            "counts": torch.tensor([float(len(t["class_labels"])) for t in labels], device=device),  # [batch]
        }

    @staticmethod
    def label_tensors(labels, device: torch.device):
        """`class_labels` and `boxes` given as Python lists or numpy arrays -> int64 / float32 tensors on `device`
        (a new list of new dicts; tensors and other keys as they are). Anything else is left to `check_labels`."""
        if not isinstance(labels, (list, tuple)):
            return labels
        converted = []
        for target in labels:
            if isinstance(target, dict):
                target = dict(target)
                for key, dtype in (("class_labels", torch.int64), ("boxes", torch.float32)):
                    value = target.get(key)
                    if value is not None and not isinstance(value, torch.Tensor):
                        value = torch.as_tensor(value, dtype=dtype, device=device)
                        target[key] = value.reshape(-1, 4) if key == "boxes" and value.numel() == 0 else value
            converted.append(target)
        return converted

    def check_labels(self, labels: list[dict], batch: int) -> None:
        """Clear errors for labels the loss cannot use, naming the image: one dict per image with int
        `class_labels` in [0, num_labels) and finite cxcywh `boxes` in [0, 1]."""
        if not isinstance(labels, (list, tuple)) or len(labels) != batch:
            length = len(labels) if hasattr(labels, "__len__") else "?"
            raise ValueError(f"labels must be a list of {batch} dicts (one per image), got "
                             f"{type(labels).__name__} of length {length}.")
        for index, target in enumerate(labels):
            if not isinstance(target, dict):
                raise ValueError(f"labels[{index}] must be a dict with 'class_labels' and 'boxes', got "
                                 f"{type(target).__name__}.")
            if "class_labels" not in target or "boxes" not in target:
                raise ValueError(f"labels[{index}] needs keys 'class_labels' and 'boxes', has {sorted(target)}.")
            classes, boxes = target["class_labels"], target["boxes"]
            if boxes.ndim != 2 or boxes.shape[-1] != 4 or classes.ndim != 1 or len(classes) != len(boxes):
                raise ValueError(
                    f"labels[{index}]: 'boxes' must be [num_objects, 4] and 'class_labels' [num_objects], got "
                    f"{list(boxes.shape)} and {list(classes.shape)}.")
            if classes.is_floating_point():
                raise ValueError(f"labels[{index}]['class_labels'] must be integers, got {classes.dtype}.")
            if len(classes) and (classes.min() < 0 or classes.max() >= self.num_labels):
                raise ValueError(
                    f"labels[{index}]['class_labels'] must be in [0, num_labels={self.num_labels}), got values "
                    f"{classes.min().item()}..{classes.max().item()}. Map dataset category ids to contiguous labels, "
                    "or build the model with the dataset's num_labels.")
            if len(boxes) and (not torch.isfinite(boxes).all() or boxes.min() < -BOX_TOLERANCE
                               or boxes.max() > 1 + BOX_TOLERANCE):
                raise ValueError(
                    f"labels[{index}]['boxes'] must be normalized (center_x, center_y, width, height) in [0, 1], got "
                    f"values {boxes.min().item():.4g}..{boxes.max().item():.4g}. Divide by the image's unpadded "
                    "width and height (DetrCustomImageProcessor does this).")

    def _normalizers(self, logits: torch.Tensor, labels: list[dict]) -> tuple[float, float]:
        """(num_boxes, class_weight_sum), each summed over processes and divided by the number of processes."""
        # every target is matched (the matcher checked targets <= queries), in every decoder layer
        matched = float(sum(len(target["class_labels"]) for target in labels))
        unmatched = logits.shape[0] * logits.shape[1] - matched
        totals = torch.tensor([matched, matched + self.eos_coefficient * unmatched], device=logits.device)
        world_size = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
            world_size = torch.distributed.get_world_size()
        num_boxes, class_weight_sum = (totals / world_size).tolist()
        return max(num_boxes, 1.0), class_weight_sum

    def _layer_losses(self, logits, pred_boxes, labels, targets: dict, num_boxes: float, class_weight_sum: float,
                      log: bool, indices=None) -> dict:
        """The class term and the box terms of one set of outputs, then the logged errors. `indices`: per image
        (query indices, target indices); None = the Hungarian matching."""
        logits, pred_boxes = logits.float(), pred_boxes.float()        # losses in fp32, also under autocast
        if indices is None:
            indices = self.matcher(logits, pred_boxes, labels, targets["padded"])
        batch_idx = torch.cat([torch.full_like(query, i) for i, (query, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([query for query, _ in indices]).to(logits.device)
        # position of each matched target in the concatenation of all images' targets
        flat_target_idx = torch.cat([target + offset for (_, target), offset in zip(indices, targets["offsets"])])
        flat_target_idx = flat_target_idx.to(logits.device)            # [num_matched]
        matched = Matched(batch_idx, query_idx, targets["classes"][flat_target_idx],
                          pred_boxes[batch_idx, query_idx], targets["boxes"][flat_target_idx])
        losses = {self.class_term.name: self.class_term.function(self, logits, matched, num_boxes, class_weight_sum)}
        for name, (function, _) in BOX_TERMS.items():
            losses[name] = function(matched, num_boxes)
        matched_classes = matched.classes

        with torch.no_grad():   # logging only
            if self.sigmoid:   # an object where some class has p > 0.5, as Deformable DETR's transformers loss
                predicted_objects = (logits.max(-1).values > 0).sum(1).float()                   # [batch]
            else:
                predicted_objects = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()  # [batch]
            losses["cardinality_error"] = F.l1_loss(predicted_objects, targets["counts"])
            if log:
                # no matched objects: nothing to get wrong, 0 % error
                correct = (logits[batch_idx, query_idx].argmax(-1) == matched_classes).float()
                losses["class_error"] = 100 * (1 - correct.mean()) if len(correct) else logits.new_zeros(())
        return losses
