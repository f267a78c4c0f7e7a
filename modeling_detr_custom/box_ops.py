"""Box format conversions and IoU / generalized IoU, as pure tensor functions.

Formats are in the names: ``cxcywh`` is (center_x, center_y, width, height), ``xyxy`` is
(x0, y0, x1, y1).
"""
import torch


def box_cxcywh_to_xyxy(boxes_cxcywh: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes_cxcywh.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def _iou_and_union(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union of boxes paired by broadcasting their leading dimensions."""
    top_left = torch.max(boxes1_xyxy[..., :2], boxes2_xyxy[..., :2])
    bottom_right = torch.min(boxes1_xyxy[..., 2:], boxes2_xyxy[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    # two zero-area boxes have union 0: the clamp keeps IoU (and its gradient) finite, 0 there
    union = (box_area(boxes1_xyxy) + box_area(boxes2_xyxy) - inter).clamp(min=torch.finfo(inter.dtype).eps)
    return inter / union, union


def _generalized_iou(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    # matches facebookresearch/detr util/box_ops.py, plus the clamps that keep degenerate boxes finite
    for boxes in (boxes1_xyxy, boxes2_xyxy):
        if not (boxes[..., 2:] >= boxes[..., :2]).all():
            raise ValueError("generalized_box_iou needs finite boxes with x1 >= x0 and y1 >= y0 (xyxy format)")
    iou, union = _iou_and_union(boxes1_xyxy, boxes2_xyxy)
    top_left = torch.min(boxes1_xyxy[..., :2], boxes2_xyxy[..., :2])
    bottom_right = torch.max(boxes1_xyxy[..., 2:], boxes2_xyxy[..., 2:])
    enclosing = (bottom_right - top_left).clamp(min=0).prod(-1).clamp(min=torch.finfo(iou.dtype).eps)
    return iou - (enclosing - union) / enclosing


def generalized_box_iou(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019): [..., N, 4] x [..., M, 4] -> [..., N, M], in [-1, 1]
    (leading dimensions, e.g. the batch, are matched, not paired).

    Degenerate boxes (zero width or height) give finite values: unions and enclosing areas are
    clamped away from zero. Inverted boxes (x1 < x0) are a caller bug and raise.
    """
    return _generalized_iou(boxes1_xyxy[..., :, None, :], boxes2_xyxy[..., None, :, :])


def elementwise_generalized_box_iou(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of matched pairs: [..., 4] x [..., 4] -> [...]; equals the diagonal of
    `generalized_box_iou` without computing the N x N matrix."""
    return _generalized_iou(boxes1_xyxy, boxes2_xyxy)


def elementwise_box_iou(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """IoU of matched pairs: [..., 4] x [..., 4] -> [...], in [0, 1] (the varifocal loss's target)."""
    return _iou_and_union(boxes1_xyxy, boxes2_xyxy)[0]


def box_iou(boxes1_xyxy: torch.Tensor, boxes2_xyxy: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU: [..., N, 4] x [..., M, 4] -> [..., N, M], in [0, 1]."""
    return _iou_and_union(boxes1_xyxy[..., :, None, :], boxes2_xyxy[..., None, :, :])[0]


def class_wise_nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                   iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression within each label (torchvision.ops.batched_nms's rule): best score first, a
    kept box removes the lower-scored boxes of its label whose IoU with it is above `iou_threshold`. boxes [N, 4],
    scores [N], labels [N] -> the indices kept, in their input order (equal scores: the earlier box first)."""
    order = scores.argsort(descending=True, stable=True)
    sorted_boxes, sorted_labels = boxes_xyxy[order], labels[order]
    overlaps = (box_iou(sorted_boxes, sorted_boxes) > iou_threshold) & (sorted_labels[:, None] == sorted_labels)
    later = [[] for _ in range(len(order))]     # later[i]: the lower-scored boxes that box i would remove
    for i, j in overlaps.triu(diagonal=1).nonzero().tolist():
        later[i].append(j)
    removed = [False] * len(order)
    for i, others in enumerate(later):
        if not removed[i]:
            for j in others:
                removed[j] = True
    kept = torch.tensor([not r for r in removed], dtype=torch.bool, device=order.device)
    return order[kept].sort().values
