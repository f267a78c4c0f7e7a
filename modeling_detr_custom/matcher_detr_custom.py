"""DETR's Hungarian matcher: the one-to-one assignment of predictions to targets at minimum cost (class cost, L1 and
GIoU of the boxes), solved per image with scipy. The set-prediction loss (`loss_detr_custom.py`) matches with it; its
class term decides the class cost (`-p` under a softmax, or the focal cost of a sigmoid head).
"""
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou


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


def pad_targets(labels: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image targets padded to the largest count: class ids `[batch, max_targets]` (padding 0) and cxcywh boxes
    `[batch, max_targets, 4]` (padding: the whole image, a valid box whose cost columns are never read)."""
    target_ids = pad_sequence([target["class_labels"] for target in labels], batch_first=True, padding_value=0)
    target_boxes = pad_sequence([target["boxes"] for target in labels], batch_first=True, padding_value=0.5)
    return target_ids, target_boxes
