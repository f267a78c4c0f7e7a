"""The fast paths give the outputs of the plain ones: folded BatchNorm, channels_last, the position-encoding cache,
bf16 autocast, batch-independent inference, the batched matcher and elementwise GIoU. Correctness only, never timing
(benchmarks/bench_model.py times them)."""
import pathlib

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from timm.layers.norm_act import FrozenBatchNorm2d
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DetrConfig
from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomLoss, HungarianMatcher
from modeling_detr_custom.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou, generalized_box_iou
from modeling_detr_custom import fast_paths
from modeling_detr_custom.fast_paths import ConvFrozenBatchNorm2d, ConvFrozenBatchNorm2dReLU
from modeling_detr_custom.testing_utils import padded_batch, randomize_, tiny_kwargs


def _model(**overrides):
    config = DetrCustomConfig(**tiny_kwargs(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **overrides))
    model = randomize_(DetrCustomForObjectDetection(config))
    model.model.backbone.fast_path_min_pixels = 0       # the fast paths at test sizes (by default from 2^17 pixels)
    return model


def _unfolded(model):
    model.model.backbone.fold_batch_norm = False
    return model


def test_folded_batch_norm_equals_unfolded_in_eval_and_training():
    model = _model()
    folded = model.model.backbone.folded_body()
    assert sum(isinstance(m, ConvFrozenBatchNorm2d) for m in folded.modules()) == 20   # every BatchNorm of resnet18
    pixel_values, pixel_mask, labels = padded_batch()
    with torch.no_grad():
        fast = model.eval()(pixel_values, pixel_mask)
        plain = _unfolded(model)(pixel_values, pixel_mask)
    assert (fast.logits - plain.logits).abs().max() <= 1e-4
    assert (fast.pred_boxes - plain.pred_boxes).abs().max() <= 1e-5
    # training: the fold shares the parameters, so the gradients are those of the unfolded body. Checked on the
    # features (the transformer's sharp random attention would amplify fp32 rounding into the comparison)
    backbone = model.model.backbone.train()
    gradients = []
    for body in (backbone.folded_body(), backbone.body):
        backbone.zero_grad()
        body(pixel_values.contiguous(memory_format=torch.channels_last))[-1].square().mean().backward()
        gradients.append({n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None})
    assert len(gradients[0]) == len(gradients[1]) == 15      # layer2-4's convolutions (stem and layer1 frozen)
    for name, grad in gradients[0].items():
        assert (grad - gradients[1][name]).norm() <= 1e-4 * gradients[1][name].norm(), name


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_trained_convolutions_run_in_the_chosen_layout_with_the_plain_gradients(monkeypatch, layout):
    # cpu_backward_layout picks the layout of the convolutions that get gradients (NCHW where oneDNN's NHWC backward
    # is slower, as with AVX2 kernels); forced here both ways, each must give the unfolded body's gradients
    monkeypatch.setenv("DETR_CUSTOM_CPU_BACKWARD_LAYOUT", layout)
    model = _model()
    backbone = model.model.backbone.train()
    pixel_values, _, _ = padded_batch()
    gradients, features = [], []
    for body in (backbone.folded_body(), backbone.body):
        backbone.zero_grad()
        feature_map = body(pixel_values.contiguous(memory_format=torch.channels_last))[-1]
        feature_map.square().mean().backward()
        features.append(feature_map)
        gradients.append({n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None})
    # layer4's output: NCHW when its convolutions switched, channels_last (the input's layout) otherwise
    assert features[0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert (features[0] - features[1]).abs().max() <= 1e-5 * features[1].abs().max()
    assert len(gradients[0]) == len(gradients[1]) == 15
    for name, grad in gradients[0].items():
        assert (grad - gradients[1][name]).norm() <= 1e-4 * gradients[1][name].norm(), name
    # inference keeps channels_last whatever the training layout
    with torch.no_grad():
        assert backbone.folded_body()(pixel_values.contiguous(memory_format=torch.channels_last))[-1] \
            .is_contiguous(memory_format=torch.channels_last)


def test_backward_layout_follows_the_cpu_capability(monkeypatch):
    from modeling_detr_custom.fast_paths import cpu_backward_layout

    monkeypatch.delenv("DETR_CUSTOM_CPU_BACKWARD_LAYOUT", raising=False)
    layout, why = cpu_backward_layout()
    capability = torch.backends.cpu.get_cpu_capability()
    assert layout == ("channels_last" if capability.startswith("AVX512") else "contiguous") and capability in why
    for forced in ("channels_last", "contiguous"):
        monkeypatch.setenv("DETR_CUSTOM_CPU_BACKWARD_LAYOUT", forced)
        assert cpu_backward_layout() == (forced, f"DETR_CUSTOM_CPU_BACKWARD_LAYOUT={forced}")


def test_one_nchw_copy_per_input_and_none_kept_alive():
    # a ResNet stage's first block reads one map in two convolutions (conv1 and the downsample): one copy serves both
    import gc
    import weakref

    from modeling_detr_custom.fast_paths import _contiguous_copy

    x = torch.randn(1, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    first = _contiguous_copy(x)
    assert first.is_contiguous() and torch.equal(first, x) and _contiguous_copy(x) is first
    x.mul_(2)                                        # changed in place: a new copy
    second = _contiguous_copy(x)
    assert second is not first and torch.equal(second, x)
    released = weakref.ref(second)
    del first, second
    gc.collect()
    assert released() is None                        # the cache holds weak references only
    assert torch.equal(_contiguous_copy(x), x)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_relu_and_residual_addition_run_inside_the_convolution_at_inference(monkeypatch):
    # every conv -> BatchNorm -> ReLU and conv -> BatchNorm -> + shortcut -> ReLU of resnet18 (stem 1, 8 blocks x 2)
    # becomes one oneDNN convolution with post-ops at CPU inference; the results are those of the separate ops
    monkeypatch.setenv("DETR_CUSTOM_CPU_BACKWARD_LAYOUT", "channels_last")    # the unfused path, same layout
    backbone = _model().eval().model.backbone
    folded = backbone.folded_body()
    assert sum(isinstance(m, ConvFrozenBatchNorm2dReLU) for m in folded.modules()) == 17
    pixel_values = padded_batch()[0].contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), _CountOps() as counted:
        fused = folded(pixel_values)
    fused_ops = 17 if fast_paths._pointwise_convolution_available() else 0     # x86 with oneDNN: 17
    assert counted.ops.count("_convolution_pointwise") == fused_ops and counted.ops.count("relu_") == 17 - fused_ops
    with torch.enable_grad(), _CountOps() as counted:                      # autograd: the separate modules
        separate = folded(pixel_values)
    assert "_convolution_pointwise" not in counted.ops and counted.ops.count("relu_") == 17
    for a, b in zip(fused, separate):
        assert a.is_contiguous(memory_format=torch.channels_last)
        assert (a - b.detach()).abs().max() <= 1e-6 * b.abs().max()
    # bf16 autocast: the fused convolution casts as autocast's conv2d does, and stays as close as bf16 allows
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused_bf16 = folded(pixel_values)[-1]
        monkeypatch.setattr(fast_paths, "_fusable", lambda conv, x: False)
        separate_bf16 = folded(pixel_values)[-1]
    assert fused_bf16.dtype == separate_bf16.dtype == torch.bfloat16
    assert (fused_bf16.float() - separate_bf16.float()).abs().max() <= 0.02 * separate_bf16.float().abs().max()
    assert (fused_bf16.float() - fused[-1]).abs().max() <= 0.05 * fused[-1].abs().max()


def test_fold_follows_weight_changes_and_keeps_the_state_dict(tmp_path):
    model = _model().eval()
    keys = list(model.state_dict())
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        before = model(pixel_values, pixel_mask).logits
        randomize_(model, seed=1)                        # in-place changes after the fold was built
        after = model(pixel_values, pixel_mask).logits
        plain = _unfolded(model)(pixel_values, pixel_mask).logits
    assert list(model.state_dict()) == keys
    assert (after - before).abs().max() > 1e-2 and (after - plain).abs().max() <= 1e-4


def test_fold_cache_sees_fused_optimizer_steps_and_writes_through_data():
    # neither bumps the version counter: the cache checks a sample of the parameters' values as well (a stale fold
    # gave the transformers Trainer example, whose default optimizer is the fused AdamW, the untrained logits)
    model = _model()
    pixel_values, pixel_mask, labels = padded_batch()

    def fast_and_plain():
        with torch.no_grad():
            fast = model.eval()(pixel_values, pixel_mask).logits
            plain = _unfolded(model)(pixel_values, pixel_mask).logits
        model.model.backbone.fold_batch_norm = True
        return fast, plain

    before, _ = fast_and_plain()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    model.train()(pixel_values, pixel_mask, labels=labels).loss.backward()
    versions = [p._version for p in model.parameters()]
    optimizer.step()
    assert [p._version for p in model.parameters()] == versions          # what the cache has to cope with
    after, plain = fast_and_plain()
    assert (after - before).abs().max() > 1e-3 and (after - plain).abs().max() <= 1e-4
    conv = model.model.backbone.body.layer4[0].conv1
    conv.weight.data.mul_(-2.0)                  # a change the logits must show (halving moved them by 3e-4 only)
    halved, plain = fast_and_plain()
    assert (halved - after).abs().max() > 1e-3 and (halved - plain).abs().max() <= 1e-4


def test_a_training_step_refolds_even_when_the_value_sample_misses_the_change():
    # a training step whose update leaves the cache's sample of a parameter unchanged (an optimizer that moves only
    # some entries, e.g. zero gradients elsewhere and no weight decay) must not leave a stale fold: train() drops it
    model = _model()
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        before = model.eval()(pixel_values, pixel_mask).logits     # the folds are cached
    conv = model.model.backbone.body.layer4[0].conv1
    flat = conv.weight.data.view(-1)
    sampled = torch.zeros_like(flat, dtype=torch.bool)
    sampled[::max(1, flat.numel() // 16)] = True
    model.train()
    flat[~sampled] *= -2.0                   # through .data: no version bump, and every sampled value unchanged
    with torch.no_grad():
        fast = model.eval()(pixel_values, pixel_mask).logits
        plain = _unfolded(model)(pixel_values, pixel_mask).logits
    assert (plain - before).abs().max() > 1e-3 and (fast - plain).abs().max() <= 1e-4


def test_fold_is_off_without_frozen_batch_norm():
    model = _model(freeze_batch_norm=False).eval()
    backbone = model.model.backbone
    assert not backbone.fold_batch_norm
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.body.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in backbone.body.modules())
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        fast = model(pixel_values, pixel_mask)            # fast_path_min_pixels = 0: channels_last, but no fold
        backbone.fast_path_min_pixels = float("inf")      # every fast path off: the plain body, contiguous
        plain = model(pixel_values, pixel_mask)
    assert backbone._folded is None                       # the fold was never built, let alone used
    assert not any(isinstance(m, ConvFrozenBatchNorm2d) for m in model.modules())
    # only the memory format differs: fp32 rounding (~3e-5 of the logits' scale, through the trainable BatchNorm)
    assert (fast.logits - plain.logits).abs().max() <= 1e-4 * plain.logits.abs().max()
    assert (fast.pred_boxes - plain.pred_boxes).abs().max() <= 1e-4
    assert (plain.logits[:, 0] - plain.logits[:, 1]).abs().max() > 1e-2   # the outputs are not constant


def test_channels_last_equals_contiguous():
    model = _unfolded(_model()).eval()
    pixel_values, pixel_mask, _ = padded_batch()
    body = model.model.backbone.body
    with torch.no_grad():
        contiguous = body(pixel_values)[-1]
        channels_last = body(pixel_values.contiguous(memory_format=torch.channels_last))[-1]
        assert channels_last.is_contiguous(memory_format=torch.channels_last)
        assert (contiguous - channels_last).abs().max() <= 1e-5 * contiguous.abs().max()
        # the model's input in either layout gives the same outputs
        assert torch.equal(model(pixel_values, pixel_mask).logits,
                           model(pixel_values.contiguous(memory_format=torch.channels_last), pixel_mask).logits)


def test_position_encoding_cache_is_exact_and_keyed_by_shape():
    model = _model().eval()
    encoding = model.model.position_embedding
    for height, width in ((3, 4), (5, 2), (3, 4)):
        mask = torch.ones((2, height, width), dtype=torch.bool)
        assert torch.equal(encoding(mask, has_padding=False), encoding(mask, has_padding=True))
    assert len(encoding._cache) == 2
    # a padded mask never reads the cache: its encoding is normalized over the visible cells only
    padded = torch.ones((1, 3, 4), dtype=torch.bool)
    padded[:, :, 3:] = False
    assert not torch.equal(encoding(padded), encoding(torch.ones((1, 3, 4), dtype=torch.bool), has_padding=False))
    # an unpadded image after a padded batch of the same size, and the reverse, match fresh computations
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        first = model(pixel_values[:1]).logits
        model(pixel_values, pixel_mask)
        encoding._cache.clear()
        assert torch.equal(model(pixel_values[:1]).logits, first)


def test_bf16_autocast_runs_and_keeps_the_top_detections():
    # random weights (no trained demo model in the tests): the bf16 backbone's ~1 % feature error moves random-weight
    # boxes by up to ~4 px at 256 px (a trained model's goal is 1 px, benchmarks/bench_model.py); labels must agree
    model = _model(num_queries=20).eval()
    with torch.no_grad():   # undo randomize_'s sharper q/k: near-one-hot attention flips on bf16 rounding
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.div_(3.0)
    pixel_values = torch.randn((1, 3, 192, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = model(pixel_values)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(pixel_values)
    assert bf16.logits.dtype == bf16.pred_boxes.dtype == torch.float32     # transformer and heads in fp32 on CPU
    scores, labels = fp32.logits[0].softmax(-1)[:, :-1].max(-1)
    top = scores.topk(5).indices                                            # compared by query: ties have no order
    assert torch.equal(bf16.logits[0, top, :-1].argmax(-1), labels[top])
    scale = torch.tensor([256, 192, 256, 192])
    boxes_px = [box_cxcywh_to_xyxy(out.pred_boxes[0, top]) * scale for out in (fp32, bf16)]
    assert (boxes_px[0] - boxes_px[1]).abs().max() <= 0.02 * 256


@pytest.mark.parametrize("auxiliary_loss", [False, True])
def test_batch_independent_outputs_equal_single_image_outputs(auxiliary_loss):
    model = _model(auxiliary_loss=auxiliary_loss).eval()
    pixel_values, pixel_mask, _ = padded_batch()                   # image 1 is 120 x 96 inside 160 x 128
    with torch.no_grad():
        alone = model(pixel_values[1:, :, :120, :96])
        default = model(pixel_values, pixel_mask)
        independent = model(pixel_values, pixel_mask, batch_independent=True)
        first_alone = model(pixel_values[:1])
    assert (default.logits[1] - alone.logits[0]).abs().max() > 1e-2   # padding changes the default path
    assert (independent.logits[1] - alone.logits[0]).abs().max() <= 1e-4
    assert (independent.pred_boxes[1] - alone.pred_boxes[0]).abs().max() <= 1e-4
    assert (independent.logits[0] - first_alone.logits[0]).abs().max() <= 1e-4
    # same-size images form one group; the feature mask marks each image's own cells
    assert independent.feature_mask[1].sum() == alone.feature_mask[0].numel()


def test_batch_independent_rejects_masks_that_are_not_top_left_rectangles():
    model = _model().eval()
    pixel_values, pixel_mask, _ = padded_batch()
    pixel_mask[1, :10] = 0                                          # padding on top
    with pytest.raises(ValueError, match="top-left"):
        model(pixel_values, pixel_mask, batch_independent=True)


def _random_targets(generator, batch, queries, targets, num_labels, layers):
    logits = torch.randn((layers, batch, queries, num_labels + 1), generator=generator)
    boxes = torch.rand((layers, batch, queries, 4), generator=generator) * 0.5 + 0.25
    counts = torch.randint(0, targets + 1, (batch,), generator=generator).tolist()
    labels = [{"class_labels": torch.randint(0, num_labels, (n,), generator=generator),
               "boxes": torch.cat([torch.rand((n, 2), generator=generator) * 0.6 + 0.2,
                                   torch.rand((n, 2), generator=generator) * 0.3 + 0.05], dim=1)} for n in counts]
    return logits, boxes, labels


def test_batched_matcher_equals_the_whole_batch_cost_formulation():
    generator = torch.Generator().manual_seed(0)
    logits, boxes, labels = _random_targets(generator, batch=6, queries=30, targets=12, num_labels=5, layers=1)
    logits, boxes = logits[0], boxes[0]
    matcher = HungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
    indices = matcher(logits, boxes, labels)
    # the previous formulation: one [batch * queries, all targets] cost matrix, each image's block cut out of it
    probs, flat_boxes = logits.flatten(0, 1).softmax(-1), boxes.flatten(0, 1)
    target_ids = torch.cat([t["class_labels"] for t in labels])
    target_boxes = torch.cat([t["boxes"] for t in labels])
    cost = (5.0 * torch.cdist(flat_boxes, target_boxes, p=1) - probs[:, target_ids]
            - 2.0 * generalized_box_iou(box_cxcywh_to_xyxy(flat_boxes), box_cxcywh_to_xyxy(target_boxes)))
    cost = cost.view(6, 30, -1).split([len(t["boxes"]) for t in labels], dim=-1)
    for image, (query_idx, target_idx) in enumerate(indices):
        assert len(query_idx) == len(labels[image]["boxes"])
        block = cost[image][image]
        expected_rows, expected_cols = linear_sum_assignment(block.numpy())
        assert torch.isclose(block[query_idx, target_idx].sum(), block[expected_rows, expected_cols].sum(), atol=1e-5)


def test_elementwise_giou_is_the_diagonal_of_the_pairwise_matrix():
    generator = torch.Generator().manual_seed(0)
    boxes1 = box_cxcywh_to_xyxy(torch.rand((50, 4), generator=generator) * 0.5 + 0.1)
    boxes2 = box_cxcywh_to_xyxy(torch.rand((50, 4), generator=generator) * 0.5 + 0.1)
    boxes2[0] = boxes1[0]                                            # identical: GIoU 1
    boxes2[1] = torch.tensor([0.3, 0.3, 0.3, 0.3])                   # a point: finite
    expected = torch.diag(generalized_box_iou(boxes1, boxes2))
    assert torch.allclose(elementwise_generalized_box_iou(boxes1, boxes2), expected, atol=1e-6)
    assert generalized_box_iou(boxes1[None], boxes2[None]).shape == (1, 50, 50)


def test_loss_equals_transformers_loss_with_auxiliary_layers():
    generator = torch.Generator().manual_seed(1)
    layers, num_labels = 3, 7
    logits, boxes, labels = _random_targets(generator, batch=4, queries=20, targets=8, num_labels=num_labels,
                                            layers=layers)
    labels[2] = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}   # an empty image
    config = DetrConfig(num_labels=num_labels, auxiliary_loss=True, decoder_layers=layers,
                        use_pretrained_backbone=False)
    expected, expected_dict, _ = ForObjectDetectionLoss(logits[-1], labels, "cpu", boxes[-1], config, logits, boxes)
    auxiliary = [{"logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])]
    actual, actual_dict = DetrCustomLoss(config)(logits[-1], boxes[-1], labels, auxiliary)
    assert abs(actual.item() - expected.item()) <= 1e-5 * abs(expected.item())
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_1", "cardinality_error"):
        assert torch.allclose(torch.as_tensor(actual_dict[name]), expected_dict[name], rtol=1e-5, atol=1e-6), name


def test_from_pretrained_keeps_the_stem_frozen(tmp_path):
    # the training benchmark's parameter set: loading must not unfreeze what the config freezes
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable
    assert "model.backbone.body.conv1.weight" not in trainable


def test_cpu_bf16_support_reads_the_cpu_flags(monkeypatch):
    from modeling_detr_custom.fast_paths import cpu_bf16_support

    monkeypatch.delenv("DETR_CUSTOM_CPU_BF16", raising=False)
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
        assert cpu_bf16_support()[0] == bool(flags & {"avx512_bf16", "amx_tile", "amx_bf16"})
    for forced, native in (("native", True), ("emulated", False)):
        monkeypatch.setenv("DETR_CUSTOM_CPU_BF16", forced)
        assert cpu_bf16_support() == (native, f"DETR_CUSTOM_CPU_BF16={forced}")


def test_bf16_autocast_training_step_gives_the_fp32_loss_and_finite_gradients():
    # only the backbone runs in bf16 on CPU (fp32_on_cpu keeps the transformer, heads and loss in fp32): over 4 seeds
    # the loss moved by at most 3.3e-4 relative, so 1 % leaves 30x margin for other CPUs' bf16 rounding
    model = _model(auxiliary_loss=True).train()
    with torch.no_grad():   # undo randomize_'s sharper q/k: near-one-hot attention flips on bf16 rounding
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.div_(3.0)
    pixel_values, pixel_mask, labels = padded_batch()
    fp32 = model(pixel_values, pixel_mask, labels=labels).loss
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(pixel_values, pixel_mask, labels=labels).loss
    bf16.backward()
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16)
    assert bf16.item() == pytest.approx(fp32.item(), rel=1e-2)
    gradients = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(grad is not None for grad in gradients.values())
    assert all(torch.isfinite(grad).all() for grad in gradients.values())
    # the bf16 backbone gets its gradients too (the frozen stem none)
    assert any(name.startswith("model.backbone.") and grad.abs().sum() > 0 for name, grad in gradients.items())


def test_cached_folds_follow_every_change_and_stay_out_of_training():
    """Without autograd the folded weights (backbone, hybrid encoder, RepVGG blocks, BatchNorm projections) are kept
    while their sources are unchanged: loading other weights, an optimizer step or `.to()` must refold, and a fold
    cached under inference_mode must never reach a training step."""
    import copy

    from modeling_detr_custom.testing_utils import train_on_a_fixed_batch

    def rt_detr_layout(seed):
        torch.manual_seed(seed)
        model = _model(decoder_type="deformable", encoder_type="hybrid", num_feature_levels=3, two_stage=True,
                       classification_loss="varifocal", projection_norm="batch", decoder_input_proj=True,
                       position_embedding_type="sine_absolute", freeze_batch_norm=False)
        return randomize_(model, seed=seed).eval()

    model, other = rt_detr_layout(0), rt_detr_layout(1)
    pixel_values, pixel_mask, _ = padded_batch(height=64, width=64)
    with torch.inference_mode():
        first = model(pixel_values, pixel_mask).logits
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        loaded = model(pixel_values, pixel_mask).logits
        expected = copy.deepcopy(other)(pixel_values, pixel_mask).logits
    assert (loaded - first).abs().max() > 1e-2 and torch.allclose(loaded, expected, atol=1e-5)
    train_on_a_fixed_batch(model, steps=2)                 # after inference_mode folds: no inference tensor saved
    model.eval()
    with torch.no_grad():
        trained = model(pixel_values, pixel_mask).logits
        fresh = copy.deepcopy(model)(pixel_values, pixel_mask).logits     # new storage: the copy refolds
    assert (trained - loaded).abs().max() > 1e-4 and torch.allclose(trained, fresh, atol=1e-5)
    with torch.no_grad():
        doubled = copy.deepcopy(model).double()(pixel_values.double(), pixel_mask).logits
    assert torch.allclose(doubled.float(), trained, atol=1e-3)


def test_speed_ups_are_one_pass_over_a_plain_model():
    """The architecture files are plain PyTorch: only the assembly (`modeling_detr_custom.py`, which applies the pass
    in post_init) and the package's public names (`__init__.py`) import `fast_paths`; the pass swaps in the fast
    classes without touching the state_dict, and `remove_fast_paths` gives the plain model, with the same outputs."""
    from modeling_detr_custom.fast_paths import FAST_CLASSES, apply_fast_paths, remove_fast_paths
    from modeling_detr_custom.testing_utils import package_import_graph

    importers = {module for module, imported in package_import_graph().items() if "fast_paths" in imported}
    assert importers == {"__init__", "modeling_detr_custom"}
    model = _model(decoder_type="deformable", encoder_type="hybrid", num_feature_levels=3, two_stage=True,
                   classification_loss="varifocal", projection_norm="batch", decoder_input_proj=True,
                   position_embedding_type="sine_absolute").eval()
    fast_classes = {type(m) for m in model.modules() if type(m) in set(FAST_CLASSES.values())}
    assert {c.__name__ for c in fast_classes} == {"FastMultiScaleBackbone", "FoldedConvNormLayer",
                                                  "FoldedProjection", "MergedRepVggBlock"}
    keys = list(model.state_dict())
    pixel_values, pixel_mask, _ = padded_batch(height=64, width=64)
    with torch.no_grad():
        fast = model(pixel_values, pixel_mask).logits
        remove_fast_paths(model)
        assert not any(type(m) in set(FAST_CLASSES.values()) for m in model.modules())
        plain = model(pixel_values, pixel_mask).logits
        apply_fast_paths(apply_fast_paths(model))          # idempotent
        again = model(pixel_values, pixel_mask).logits
    assert list(model.state_dict()) == keys
    assert (fast - plain).abs().max() <= 1e-4 * plain.abs().max() and torch.equal(fast, again)
