"""Matcher and set-prediction loss: optimality, batch invariance, edge cases, gradients, multi-process."""
import itertools
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomLoss, HungarianMatcher
from modeling_detr_custom.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from modeling_detr_custom.testing_utils import padded_batch, randomize_, tiny_kwargs


def _random_boxes(n, generator):
    centers = torch.rand((n, 2), generator=generator) * 0.6 + 0.2
    sizes = torch.rand((n, 2), generator=generator) * 0.3 + 0.05
    return torch.cat([centers, sizes], dim=1)


def _brute_force_cost(matcher, logits, boxes, labels):
    probs = logits.softmax(-1)
    cost = (matcher.class_cost * -probs[:, labels["class_labels"]]
            + matcher.bbox_cost * torch.cdist(boxes, labels["boxes"], p=1)
            - matcher.giou_cost * generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(labels["boxes"])))
    num_queries, num_targets = cost.shape
    assignments = itertools.permutations(range(num_queries), num_targets)   # query chosen for each target
    best = min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in assignments)
    return cost, best


@pytest.mark.parametrize("seed", range(5))
def test_matcher_finds_the_minimum_cost_assignment(seed):
    generator = torch.Generator().manual_seed(seed)
    num_queries, num_targets = 6, int(torch.randint(1, 5, (1,), generator=generator))
    logits = torch.randn((1, num_queries, 4), generator=generator)
    boxes = _random_boxes(num_queries, generator)[None]
    labels = [{"class_labels": torch.randint(0, 3, (num_targets,), generator=generator),
               "boxes": _random_boxes(num_targets, generator)}]
    matcher = HungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
    (query_idx, target_idx), = matcher(logits, boxes, labels)
    cost, best = _brute_force_cost(matcher, logits[0], boxes[0], labels[0])
    assert len(query_idx) == num_targets and sorted(target_idx.tolist()) == list(range(num_targets))
    assert torch.isclose(cost[query_idx, target_idx].sum(), best, atol=1e-5)


def test_matcher_is_batch_invariant():
    matcher = HungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
    generator = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn((3, 10, 4), generator=generator), _random_boxes(30, generator).view(3, 10, 4)
    labels = [{"class_labels": torch.tensor([0, 2]), "boxes": _random_boxes(2, generator)},
              {"class_labels": torch.tensor([], dtype=torch.long), "boxes": torch.zeros(0, 4)},
              {"class_labels": torch.tensor([1, 1, 0]), "boxes": _random_boxes(3, generator)}]
    batched = matcher(logits, boxes, labels)
    for i in range(3):
        single = matcher(logits[i:i + 1], boxes[i:i + 1], labels[i:i + 1])[0]
        assert [t.tolist() for t in single] == [t.tolist() for t in batched[i]]
    assert len(batched[1][0]) == 0


def test_matcher_with_no_targets_at_all():
    matcher = HungarianMatcher()
    empty = [{"class_labels": torch.tensor([], dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    indices = matcher(torch.randn(2, 5, 3), torch.rand(2, 5, 4), empty)
    assert all(len(q) == 0 and len(t) == 0 for q, t in indices)


def test_more_targets_than_queries_is_a_clear_error():
    labels = [{"class_labels": torch.zeros(6, dtype=torch.long), "boxes": torch.full((6, 4), 0.5)}]
    with pytest.raises(ValueError, match="6 objects.*num_queries=5"):
        HungarianMatcher()(torch.randn(1, 5, 3), torch.rand(1, 5, 4), labels)


def _model(**overrides):
    config = DetrCustomConfig(**tiny_kwargs(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **overrides))
    return randomize_(DetrCustomForObjectDetection(config))


def test_loss_is_finite_with_empty_targets_and_degenerate_boxes():
    model = _model()
    pixel_values, pixel_mask, _ = padded_batch()
    empty = [{"class_labels": torch.tensor([], dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    out = model(pixel_values, pixel_mask, labels=empty)
    assert torch.isfinite(out.loss) and out.loss_dict["loss_bbox"] == 0 and out.loss_dict["loss_giou"] == 0
    out.loss.backward()
    # degenerate targets (zero width / height, a point) and degenerate predictions
    degenerate = [{"class_labels": torch.tensor([0, 1, 2]),
                   "boxes": torch.tensor([[0.5, 0.5, 0.0, 0.2], [0.2, 0.2, 0.3, 0.0], [0.7, 0.7, 0.0, 0.0]])},
                  {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.0, 0.0, 0.0, 0.0]])}]
    model.zero_grad()
    out = model(pixel_values, pixel_mask, labels=degenerate)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    logits, boxes = torch.randn(1, 4, 4, requires_grad=True), torch.zeros(1, 4, 4, requires_grad=True)
    loss, _ = DetrCustomLoss(model.config)(logits, boxes, degenerate[1:])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(boxes.grad).all()


def test_gradients_reach_every_trainable_parameter_and_no_frozen_one():
    model = _model(auxiliary_loss=True)
    pixel_values, pixel_mask, labels = padded_batch()
    model(pixel_values, pixel_mask, labels=labels).loss.backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.backbone.body.conv1.weight", "model.backbone.body.layer1.0.conv1.weight"} <= frozen
    assert not any(n.startswith(("model.backbone.body.layer2", "model.backbone.body.layer4")) for n in frozen)
    assert all(not n.startswith("model.backbone") or ".layer1." in n or "conv1" in n for n in frozen)
    params = dict(model.named_parameters())
    assert [n for n in trainable if params[n].grad is None] == []
    # the first decoder layer's input is all zeros, so its self-attention value weights get a zero gradient
    # (as in the original); every other trainable tensor gets a non-zero one
    zero = [n for n in trainable if params[n].grad.abs().sum() == 0]
    assert zero == ["model.decoder.layers.0.self_attn.v_proj.weight"]
    assert all(dict(model.named_parameters())[n].grad is None for n in frozen)


@pytest.mark.parametrize("labels, message", [
    ([{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 1.5, 0.2]])}], r"\[0, 1\]"),
    ([{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2]])}], r"\[num_objects, 4\]"),
    ([{"class_labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}], "num_labels=3"),
    ([{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[float("nan"), 0.5, 0.2, 0.2]])}], r"\[0, 1\]"),
    ([{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}], "class_labels"),
    ([], "list of 1 dicts"),
])
def test_bad_labels_are_clear_errors(labels, message):
    model = _model().eval()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, 64, 64), labels=labels)


def _distributed_loss(rank, world_size, port, state, pixel_values, pixel_mask, labels, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs(auxiliary_loss=True))).eval()
    model.load_state_dict(state)
    out = model(pixel_values[rank:rank + 1], pixel_mask[rank:rank + 1], labels=labels[rank:rank + 1])
    total = out.loss.detach().clone()
    dist.all_reduce(total)                                     # what DDP's gradient averaging amounts to
    results[rank] = (total / world_size).item()
    dist.destroy_process_group()


def test_loss_is_the_same_on_one_and_two_processes():
    model = _model(auxiliary_loss=True).eval()
    pixel_values, pixel_mask, labels = padded_batch()
    labels[1] = {"class_labels": torch.tensor([1, 0, 2]), "boxes": torch.tensor(
        [[0.4, 0.6, 0.5, 0.2], [0.2, 0.2, 0.1, 0.3], [0.7, 0.7, 0.2, 0.2]])}   # 2 + 3 boxes: unequal split
    with torch.no_grad():
        single = model(pixel_values, pixel_mask, labels=labels).loss.item()
    results = mp.Manager().dict()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_distributed_loss, args=(2, port, model.state_dict(), pixel_values, pixel_mask, labels, results),
             nprocs=2, join=True)
    # box losses are normalized by all matched boxes / world size, the class loss by all class weights / world size
    assert results[0] == pytest.approx(single, rel=1e-5) and results[1] == pytest.approx(single, rel=1e-5)


# ---------------------------------------------------------------- sigmoid heads against transformers' references


def _sigmoid_case(seed, batch=3, queries=12, classes=5):
    generator = torch.Generator().manual_seed(seed)
    layers = [(torch.randn((batch, queries, classes), generator=generator) * 2,
               _random_boxes(batch * queries, generator).view(batch, queries, 4)) for _ in range(2)]
    counts = [3, 0, 5][:batch]
    labels = [{"class_labels": torch.randint(0, classes, (n,), generator=generator),
               "boxes": _random_boxes(n, generator)} for n in counts]
    return layers, labels


def _sigmoid_config(loss, classes=5, **overrides):
    return DetrCustomConfig(**tiny_kwargs(num_labels=classes, classification_loss=loss, class_cost=2.0, **overrides))


@pytest.mark.parametrize("seed", range(3))
def test_focal_matcher_and_loss_equal_transformers_deformable_detr(seed):
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher, DeformableDetrImageLoss

    (last, aux), labels = _sigmoid_case(seed)
    criterion = DetrCustomLoss(_sigmoid_config("focal"))
    reference_matcher = DeformableDetrHungarianMatcher(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)
    ours = criterion.matcher(*last, labels)
    theirs = reference_matcher({"logits": last[0], "pred_boxes": last[1]}, labels)
    assert [[t.tolist() for t in pair] for pair in ours] == [[t.tolist() for t in pair] for pair in theirs]

    reference = DeformableDetrImageLoss(reference_matcher, num_classes=5, focal_alpha=0.25,
                                        losses=["labels", "boxes", "cardinality"])
    expected = reference({"logits": last[0], "pred_boxes": last[1],
                          "auxiliary_outputs": [{"logits": aux[0], "pred_boxes": aux[1]}]}, labels)
    _, found = criterion(*last, labels, auxiliary_outputs=[{"logits": aux[0], "pred_boxes": aux[1]}])
    # their focal term is named loss_ce, ours loss_focal (the logs name the term computed)
    for name in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "loss_ce_0", "loss_bbox_0", "loss_giou_0"):
        ours_name = name.replace("loss_ce", "loss_focal")
        assert found[ours_name].item() == pytest.approx(expected[name].item(), rel=1e-6, abs=1e-7), name


@pytest.mark.parametrize("seed", range(3))
def test_varifocal_matcher_and_loss_equal_transformers_rt_detr(seed):
    from transformers import RTDetrConfig
    from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher, RTDetrLoss

    (last, aux), labels = _sigmoid_case(seed)
    reference_config = RTDetrConfig(num_labels=5, use_focal_loss=True)   # matcher 2 / 5 / 2, alpha .25, VFL alpha .75
    criterion = DetrCustomLoss(_sigmoid_config("varifocal"))
    ours = criterion.matcher(*last, labels)
    theirs = RTDetrHungarianMatcher(reference_config)({"logits": last[0], "pred_boxes": last[1]}, labels)
    assert [[t.tolist() for t in pair] for pair in ours] == [[t.tolist() for t in pair] for pair in theirs]

    # RTDetrLoss returns weighted terms (vfl 1, bbox 5, giou 2) and names auxiliary ones <name>_aux_<layer>
    expected = RTDetrLoss(reference_config)({"logits": last[0], "pred_boxes": last[1],
                                             "auxiliary_outputs": [{"logits": aux[0], "pred_boxes": aux[1]}]}, labels)
    _, found = criterion(*last, labels, auxiliary_outputs=[{"logits": aux[0], "pred_boxes": aux[1]}])
    for ours_name, theirs_name, weight in (("loss_vfl", "loss_vfl", 1), ("loss_bbox", "loss_bbox", 5),
                                           ("loss_giou", "loss_giou", 2), ("loss_vfl_0", "loss_vfl_aux_0", 1),
                                           ("loss_bbox_0", "loss_bbox_aux_0", 5)):
        assert found[ours_name].item() * weight == pytest.approx(expected[theirs_name].item(), rel=1e-6, abs=1e-7)


def test_focal_and_varifocal_losses_equal_the_formulas_on_hand_cases():
    # one image, one query, two classes; the query is matched to class 1 with a box of IoU 0.5 with its target
    logits = torch.tensor([[[0.5, -1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4]]])
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    p0, p1 = torch.sigmoid(torch.tensor(0.5)).item(), torch.sigmoid(torch.tensor(-1.0)).item()
    alpha, gamma = 0.25, 2.0
    # focal: class 0 negative, class 1 positive; / num_boxes = 1
    focal = (1 - alpha) * p0 ** gamma * -math.log(1 - p0) + alpha * (1 - p1) ** gamma * -math.log(p1)
    _, found = DetrCustomLoss(_sigmoid_config("focal", classes=2, auxiliary_loss=False))(logits, boxes, labels)
    assert found["loss_focal"].item() == pytest.approx(focal, rel=1e-6) and "loss_ce" not in found
    # varifocal: target q = IoU = 0.5 at class 1, weighted by q; class 0 negative weighted by 0.75 p^gamma
    iou = 0.5
    varifocal = (0.75 * p0 ** gamma * -math.log(1 - p0)
                 + iou * -(iou * math.log(p1) + (1 - iou) * math.log(1 - p1)))
    _, found = DetrCustomLoss(_sigmoid_config("varifocal", classes=2, auxiliary_loss=False))(logits, boxes, labels)
    assert found["loss_vfl"].item() == pytest.approx(varifocal, rel=1e-6)
    # the focal matching cost prefers the query whose target class is likely
    matcher = HungarianMatcher(class_cost=1.0, bbox_cost=0.0, giou_cost=0.0, focal_alpha=0.25)
    (query, _), = matcher(torch.tensor([[[-3.0, 0.0], [3.0, 0.0]]]), torch.rand(1, 2, 4) * 0.2 + 0.4,
                          [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}])
    assert query.tolist() == [1]


def test_varifocal_target_is_detached_and_focal_normalizes_globally():
    (last, _), labels = _sigmoid_case(0)
    logits, boxes = last[0].clone().requires_grad_(), last[1].clone().requires_grad_()
    _, found = DetrCustomLoss(_sigmoid_config("varifocal", auxiliary_loss=False))(logits, boxes, labels)
    found["loss_vfl"].backward()
    assert boxes.grad is None or boxes.grad.abs().sum() == 0       # the IoU target carries no box gradient
    assert logits.grad.abs().sum() > 0
    # the class weight applies to the class term only, and 1.0 leaves today's total unchanged
    config = _sigmoid_config("focal", auxiliary_loss=False)
    total, terms = DetrCustomLoss(config)(*last, labels)
    config.class_loss_coefficient = 2.0
    doubled, _ = DetrCustomLoss(config)(*last, labels)
    assert (doubled - total).item() == pytest.approx(terms["loss_focal"].item(), rel=1e-5)


@pytest.mark.parametrize("loss, name, head, cost", [("cross_entropy", "loss_ce", "softmax", "probability"),
                                                    ("focal", "loss_focal", "sigmoid", "focal"),
                                                    ("varifocal", "loss_vfl", "sigmoid", "focal")])
def test_the_class_term_table_names_the_term_its_head_cost_and_weight(loss, name, head, cost):
    from modeling_detr_custom.class_head import class_head_outputs
    from modeling_detr_custom.loss_detr_custom import CLASS_TERMS
    from modeling_detr_custom.matcher_detr_custom import HungarianMatcher as MatcherInItsFile

    term = CLASS_TERMS[loss]
    assert (term.name, term.head, term.matching_cost) == (name, head, cost)
    config = DetrCustomConfig(**tiny_kwargs(classification_loss=loss, class_loss_coefficient=3.0))
    assert class_head_outputs(config) == config.num_labels + (head == "softmax")   # the head the term declares
    criterion = DetrCustomLoss(config)
    assert HungarianMatcher is MatcherInItsFile and (criterion.matcher.focal_alpha is None) == (cost == "probability")
    assert criterion.weights == {name: 3.0, "loss_bbox": 5.0, "loss_giou": 2.0}   # by the terms' own names
    model = randomize_(DetrCustomForObjectDetection(config)).train()
    pixel_values, pixel_mask, labels = padded_batch()
    out = model(pixel_values, pixel_mask, labels=labels)
    assert {name, f"{name}_0"} <= set(out.loss_dict)
    assert not {"loss_ce", "loss_focal", "loss_vfl"} - {name} & set(out.loss_dict)   # logs name the term computed
    expected = sum(out.loss_dict[f"{term}{suffix}"] * weight for term, weight in criterion.weights.items()
                   for suffix in ("", "_0"))
    assert torch.allclose(out.loss, expected)
