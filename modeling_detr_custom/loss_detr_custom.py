"""Hungarian matcher and DETR's set-prediction loss, with the class term chosen by `config.classification_loss`:
softmax cross-entropy (DETR), sigmoid focal (Deformable DETR) or varifocal (RT-DETR).

Called explicitly by `DetrCustomForObjectDetection` (never through transformers' `loss_function`, which picks a
loss by class name and normalizes `num_boxes` differently across processes, see docs/ARCHITECTURE.md).
"""
import itertools
import re

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .box_ops import box_cxcywh_to_xyxy, elementwise_box_iou, elementwise_generalized_box_iou, generalized_box_iou
from .configuration_detr_custom import DetrCustomConfig, uses_sigmoid_classes
from .query_groups import fold_groups

BOX_TOLERANCE = 1e-4   # normalized boxes may overshoot [0, 1] by float rounding, not more


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets, per image, at minimum cost.

    cost = class_cost * class cost + bbox_cost * L1(boxes) + giou_cost * (-GIoU(boxes)), computed for all
    images at once on targets padded to the largest count (`[batch, queries, max_targets]`: no cross-image pairs),
    copied to the CPU once and solved per image with scipy's `linear_sum_assignment`. The class cost is -p(target
    class) under a softmax (DETR), or with `focal_alpha` set the focal cost of a sigmoid head (Deformable DETR):
    alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)), p the sigmoid of the target class's logit.
    """

    def __init__(self, class_cost: float = 1.0, bbox_cost: float = 5.0, giou_cost: float = 2.0,
                 focal_alpha: float | None = None, focal_gamma: float = 2.0):
        super().__init__()
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("class_cost, bbox_cost and giou_cost cannot all be 0.")
        self.class_cost, self.bbox_cost, self.giou_cost = class_cost, bbox_cost, giou_cost
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, pred_boxes: torch.Tensor, labels: list[dict], padded_targets=None):
        """
        Args:
            logits: `[batch, queries, num_labels + 1]` (softmax) or `[batch, queries, num_labels]` (focal cost);
                pred_boxes: `[batch, queries, 4]`, cxcywh in [0, 1].
            labels: per image, `class_labels` `[num_targets]` and `boxes` `[num_targets, 4]` cxcywh.
            padded_targets: `pad_targets(labels)`, when the caller matches the same labels several times.
        Returns:
            per image, `(query_indices, target_indices)` int64 tensors of length min(queries, num_targets).
        """
        batch, num_queries = logits.shape[:2]
        sizes = [len(target["class_labels"]) for target in labels]
        for image_index, size in enumerate(sizes):
            if size > num_queries:
                raise ValueError(
                    f"image {image_index} of the batch has {size} objects but the model has only num_queries="
                    f"{num_queries}: each object needs its own query. Raise config.num_queries or drop objects."
                )
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(batch)]
        # diverged predictions: a clear error before the box functions reject NaN boxes as malformed
        if not (torch.isfinite(logits).all() and torch.isfinite(pred_boxes).all()):
            raise FloatingPointError("the predictions contain NaN or inf: training diverged.")
        target_ids, target_boxes = padded_targets if padded_targets is not None else pad_targets(labels)
        target_ids = target_ids.to(logits.device)                      # [batch, max_targets], padding: class 0
        target_boxes = target_boxes.to(logits.device).float()          # [batch, max_targets, 4]
        boxes_cxcywh = pred_boxes.float()                              # [batch, queries, 4]
        target_columns = target_ids[:, None, :].expand(-1, num_queries, -1)   # [batch, queries, max_targets]
        if self.focal_alpha is None:
            probs = logits.float().softmax(-1)                         # [batch, queries, num_labels + 1]
            # 1 - p(class) ranks matches the same as -p(class), so the constant is dropped
            cost_class = -probs.gather(2, target_columns)              # [batch, queries, max_targets]
        else:
            probs = logits.float().sigmoid().gather(2, target_columns)  # [batch, queries, max_targets]
            cost_class = focal_matching_cost(probs, self.focal_alpha, self.focal_gamma)
        cost_bbox = torch.cdist(boxes_cxcywh, target_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes_cxcywh), box_cxcywh_to_xyxy(target_boxes))
        cost = self.bbox_cost * cost_bbox + self.class_cost * cost_class + self.giou_cost * cost_giou
        cost = cost.cpu().numpy()                                      # [batch, queries, max_targets]
        indices = []
        for image_cost, size in zip(cost, sizes):
            query_idx, target_idx = linear_sum_assignment(image_cost[:, :size])
            indices.append((torch.from_numpy(query_idx).long(), torch.from_numpy(target_idx).long()))
        return indices


def focal_matching_cost(probs: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """The focal loss of a positive minus that of a negative, per sigmoid probability (any shape); the 1e-8 inside the
    logs matches Deformable DETR's matcher (models/matcher.py) and transformers' DeformableDetrHungarianMatcher."""
    positive = alpha * (1 - probs) ** gamma * -(probs + 1e-8).log()
    negative = (1 - alpha) * probs ** gamma * -(1 - probs + 1e-8).log()
    return positive - negative


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


def _term(name: str) -> str:
    """`loss_ce_3` / `loss_ce_enc` / `loss_ce_dn_0` -> `loss_ce`: every layer's terms weigh as the last's."""
    return re.sub(r"_(\d+|enc|dn_\d+)$", "", name)


def pad_targets(labels: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image targets padded to the largest count: class ids `[batch, max_targets]` (padding 0) and cxcywh boxes
    `[batch, max_targets, 4]` (padding: the whole image, a valid box whose cost columns are never read)."""
    target_ids = pad_sequence([target["class_labels"] for target in labels], batch_first=True, padding_value=0)
    target_boxes = pad_sequence([target["boxes"] for target in labels], batch_first=True, padding_value=0.5)
    return target_ids, target_boxes


class DetrCustomLoss(nn.Module):
    """DETR's set-prediction loss: Hungarian matching, then a class term, L1 and GIoU on matched boxes; repeated on
    every auxiliary decoder output. The class term (`loss_ce`) is `config.classification_loss`: cross-entropy with
    "no object" weighted by `eos_coefficient` (DETR), or over the num_labels sigmoid logits the focal loss
    (Deformable DETR) or the varifocal loss with the matched box's IoU as target (RT-DETR), each summed over queries
    and classes and divided by `num_boxes`; the matcher then uses the focal cost.

    Box losses are divided by `num_boxes`: matched targets summed over all processes / number of processes
    (at least 1), as in the original. The cross-entropy is a weighted mean whose denominator (the sum of class
    weights: 1 per matched query, `eos_coefficient` per other query) is normalized the same way; on one process
    this is exactly the original's `F.cross_entropy(..., weight)`, and on N processes it makes the averaged loss
    equal to the single-process loss of the same global batch (the original's per-process mean does not).
    """

    def __init__(self, config):
        super().__init__()
        self.classification_loss = getattr(config, "classification_loss", "cross_entropy")
        self.sigmoid = uses_sigmoid_classes(config)
        # a transformers DetrConfig (or a config saved before these fields) works too: the fields' defaults apply
        for name in ("focal_alpha", "focal_gamma", "varifocal_alpha", "class_loss_coefficient"):
            setattr(self, name, getattr(config, name, getattr(DetrCustomConfig, name)))
        self.matcher = HungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost,
                                        focal_alpha=self.focal_alpha if self.sigmoid else None,
                                        focal_gamma=self.focal_gamma)
        self.num_labels = config.num_labels
        self.eos_coefficient = config.eos_coefficient
        self.weights = {"loss_ce": self.class_loss_coefficient, "loss_bbox": config.bbox_loss_coefficient,
                        "loss_giou": config.giou_loss_coefficient}

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
        before its forward).

        `num_query_groups` K > 1 (Group DETR, `query_groups.py`): the matching outputs (`logits`, `pred_boxes`, the
        auxiliary and encoder outputs) hold K groups of queries, `[batch, K * queries, ...]`, each matched to the
        labels on its own. They are folded into the batch (K copies of each image), so one matching pass per layer
        serves every group, and normalized by K times the first group's normalizers: each term is the mean over
        groups of the 1-group term (LW-DETR's `num_boxes * group_detr`). The denoising terms keep the 1-group
        normalizers: they are the terms a 1-group model with the same outputs gets."""
        batch = logits.shape[0]
        if not labels_checked:
            labels = self.label_tensors(labels, logits.device)
            self.check_labels(labels, batch=batch)
        num_boxes, class_weight_sum = self._normalizers(logits[:, :logits.shape[1] // num_query_groups], labels)
        targets = self._targets(labels, logits.device)   # gathered once for every decoder layer
        if denoising_outputs is not None:   # on the unfolded batch, before the groups scale the normalizers
            denoising_dict = self._denoising_losses(denoising_outputs, labels, targets, num_boxes, class_weight_sum)
        if num_query_groups > 1:
            logits, pred_boxes = fold_groups(logits, num_query_groups), fold_groups(pred_boxes, num_query_groups)
            auxiliary_outputs = [{name: fold_groups(value, num_query_groups) for name, value in layer.items()}
                                 for layer in auxiliary_outputs or []]
            if encoder_outputs is not None:
                encoder_outputs = {name: fold_groups(value, num_query_groups)
                                   for name, value in encoder_outputs.items()}
            labels = list(labels) * num_query_groups
            num_boxes, class_weight_sum = num_boxes * num_query_groups, class_weight_sum * num_query_groups
            targets = self._targets(labels, logits.device)   # of the folded batch
        loss_dict = self._layer_losses(logits, pred_boxes, labels, targets, num_boxes, class_weight_sum, log=True)
        for layer, aux in enumerate(auxiliary_outputs or []):
            aux_losses = self._layer_losses(
                aux["logits"], aux["pred_boxes"], labels, targets, num_boxes, class_weight_sum, log=False)
            loss_dict.update({f"{name}_{layer}": value for name, value in aux_losses.items()})
        if encoder_outputs is not None:
            encoder_losses = self._layer_losses(encoder_outputs["logits"], encoder_outputs["pred_boxes"], labels,
                                                targets, num_boxes, class_weight_sum, log=False)
            loss_dict.update({f"{name}_enc": value for name, value in encoder_losses.items()})
        if denoising_outputs is not None:
            loss_dict.update(denoising_dict)
        loss = sum(value * self.weights[_term(name)]
                   for name, value in loss_dict.items() if _term(name) in self.weights)
        return loss, loss_dict

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

    def _denoising_losses(self, denoising_outputs: dict, labels, targets: dict, num_boxes: float,
                          class_weight_sum: float) -> dict:
        """Every decoder layer's terms of the denoising queries (`loss_ce_dn_0`, ...): their fixed assignment,
        normalized by num_boxes x the number of denoising groups (RT-DETR's)."""
        loss_dict = {}
        for layer, (layer_logits, layer_boxes) in enumerate(zip(denoising_outputs["logits"],
                                                                denoising_outputs["pred_boxes"])):
            denoising_losses = self._layer_losses(
                layer_logits, layer_boxes, labels, targets, num_boxes * denoising_outputs["num_groups"],
                class_weight_sum, log=False, indices=denoising_outputs["indices"])
            loss_dict.update({f"{name}_dn_{layer}": value for name, value in denoising_losses.items()})
        return loss_dict

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
        """`indices`: per image (query indices, target indices); None = the Hungarian matching."""
        logits, pred_boxes = logits.float(), pred_boxes.float()        # losses in fp32, also under autocast
        if indices is None:
            indices = self.matcher(logits, pred_boxes, labels, targets["padded"])
        batch_idx = torch.cat([torch.full_like(query, i) for i, (query, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([query for query, _ in indices]).to(logits.device)
        # position of each matched target in the concatenation of all images' targets
        flat_target_idx = torch.cat([target + offset for (_, target), offset in zip(indices, targets["offsets"])])
        flat_target_idx = flat_target_idx.to(logits.device)            # [num_matched]
        matched_classes = targets["classes"][flat_target_idx]          # [num_matched]
        matched_boxes = pred_boxes[batch_idx, query_idx]               # [num_matched, 4]
        target_boxes = targets["boxes"][flat_target_idx]               # [num_matched, 4]
        matched = (batch_idx, query_idx, matched_classes)
        if self.sigmoid:
            losses = {"loss_ce": self._sigmoid_class_loss(logits, matched, matched_boxes, target_boxes, num_boxes)}
        else:
            target_classes = torch.full(logits.shape[:2], self.num_labels, dtype=torch.int64, device=logits.device)
            target_classes[batch_idx, query_idx] = matched_classes    # [batch, queries], unmatched = no object
            class_weight = torch.ones(self.num_labels + 1, device=logits.device)
            class_weight[-1] = self.eos_coefficient
            loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, class_weight, reduction="sum")
            losses = {"loss_ce": loss_ce / class_weight_sum}

        losses["loss_bbox"] = F.l1_loss(matched_boxes, target_boxes, reduction="none").sum() / num_boxes
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(target_boxes))
        losses["loss_giou"] = (1 - giou).sum() / num_boxes             # giou: [num_matched]

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

    def _sigmoid_class_loss(self, logits, matched, matched_boxes, target_boxes, num_boxes: float) -> torch.Tensor:
        """Focal or varifocal loss over `[batch, queries, num_labels]` sigmoid logits, summed / num_boxes (Deformable
        DETR's and RT-DETR's normalization: their mean over queries times the number of queries)."""
        batch_idx, query_idx, matched_classes = matched
        positives = torch.zeros_like(logits)                            # [batch, queries, num_labels]
        positives[batch_idx, query_idx, matched_classes] = 1.0
        if self.classification_loss == "focal":
            loss = sigmoid_focal_loss(logits, positives, self.focal_alpha, self.focal_gamma)
        else:
            with torch.no_grad():   # the target is the box's quality, not something to optimize through
                iou = elementwise_box_iou(box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(target_boxes))
            target_scores = torch.zeros_like(logits)
            target_scores[batch_idx, query_idx, matched_classes] = iou.to(logits.dtype)
            loss = varifocal_loss(logits, target_scores, positives, self.varifocal_alpha, self.focal_gamma)
        return loss.sum() / num_boxes
