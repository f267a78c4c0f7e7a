"""Multi-scale deformable attention: ours (attention_deformable.py) vs transformers' pytorch path, same inputs.

    .venv/bin/python -m benchmarks.bench_attention_deformable [--rounds 7] [--threads N] [--device cpu|cuda]

RT-DETR-like sizes: the 3 levels of a 640x640 input (80x80, 40x40, 20x20 = 8400 positions), d_model 256, 8 heads,
4 points per level, 300 queries with box references, batch 2, the second image padded (a value mask). Both modules
hold the same random weights (`randomize_`). Runs are interleaved (transformers, ours, ...); the table shows median
milliseconds, the speed ratio (transformers / ours) and the largest output difference.

Rows:
  sampling fwd / fwd+bwd   the sampling core alone: transformers' `MultiScaleDeformableAttention` (the function
                           behind its kernels-hub fallback) vs our `multi_scale_deformable_attention`, given value,
                           locations and weights; the backward reaches value, locations and weights
  module fwd / fwd+bwd     the whole attention (value / offset / weight / output projections, mask, softmax, box
                           offsets): `DeformableDetrMultiscaleDeformableAttention` vs `DetrCustomDeformableAttention`
  module fwd bf16          both under torch.autocast(bfloat16) (on CPU only where bf16 is native); diff = each one's
                           largest difference from its own fp32 output, relative to the output's largest magnitude
  value_proj share         not a comparison: the value projection (8400 x 256 x 256 per image) alone, as a share of
                           our module's forward, the part no sampling strategy can remove
Not a test: speed is never asserted. Ratios are only comparable within one run, on one kind of machine.
"""
import argparse

import torch
from transformers import DeformableDetrConfig
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrMultiscaleDeformableAttention, MultiScaleDeformableAttention)

from modeling_detr_custom.attention_deformable import DetrCustomDeformableAttention, multi_scale_deformable_attention
from modeling_detr_custom.testing_utils import randomize_  # the tests' meaningful random weights

from benchmarks.bench_model import bf16_skip_reason, interleaved
from benchmarks.machine import describe_machine, format_machine

SHAPES = [(80, 80), (40, 40), (20, 20)]
D_MODEL, HEADS, POINTS, QUERIES, BATCH = 256, 8, 4, 300, 2


def make_inputs(device):
    generator = torch.Generator().manual_seed(0)
    sequence = sum(h * w for h, w in SHAPES)
    query = torch.randn(BATCH, QUERIES, D_MODEL, generator=generator)
    value = torch.randn(BATCH, sequence, D_MODEL, generator=generator)
    boxes = torch.rand(BATCH, QUERIES, 1, 4, generator=generator) * 0.5 + 0.2
    mask = torch.ones(BATCH, sequence, dtype=torch.bool)
    start = 0
    for height, width in SHAPES:        # image 1: the right quarter and bottom quarter of every level are padding
        level = torch.ones(height, width, dtype=torch.bool)
        level[height * 3 // 4:] = False
        level[:, width * 3 // 4:] = False
        mask[1, start:start + height * width] = level.flatten()
        start += height * width
    shapes = torch.tensor(SHAPES)
    level_start_index = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    tensors = dict(query=query, value=value, boxes=boxes.expand(-1, -1, len(SHAPES), -1).contiguous(), mask=mask,
                   shapes=shapes, level_start_index=level_start_index)
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def synchronized(function, device):
    def run():
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result
    return run


def fmt(seconds):
    return f"{seconds * 1e3:9.2f}"


def print_row(name, reference_s, ours_s, diff):
    print(f"{name:<24} {fmt(reference_s)} {fmt(ours_s)} {reference_s / ours_s:7.2f}x  {diff}", flush=True)


def sampling_rows(inputs, rounds, device):
    generator = torch.Generator().manual_seed(1)
    head_dim = D_MODEL // HEADS
    sequence = inputs["value"].shape[1]
    value = torch.randn(BATCH, sequence, HEADS, head_dim, generator=generator).to(device)
    locations = (torch.rand(BATCH, QUERIES, HEADS, len(SHAPES), POINTS, 2, generator=generator) * 1.1 - 0.05)
    weights = torch.rand(BATCH, QUERIES, HEADS, len(SHAPES), POINTS, generator=generator).softmax(-1)
    locations, weights = locations.to(device), weights.to(device)
    core = MultiScaleDeformableAttention()

    def reference(v, loc, w):
        return core(v, inputs["shapes"], SHAPES, inputs["level_start_index"], loc, w, 64)

    def ours(v, loc, w):
        return multi_scale_deformable_attention(v, SHAPES, loc.flatten(3, 4), w.flatten(3, 4), [POINTS] * 3)

    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]

    def backward(function):
        def run():
            for leaf in leaves:
                leaf.grad = None
            function(*leaves).square().sum().backward()
        return synchronized(run, device)

    with torch.no_grad():
        diff = (reference(value, locations, weights) - ours(value, locations, weights)).abs().max().item()
        times = interleaved({"reference": synchronized(lambda: reference(value, locations, weights), device),
                             "ours": synchronized(lambda: ours(value, locations, weights), device)}, rounds)
    print_row("sampling fwd", times["reference"], times["ours"], f"max |diff| {diff:.1e}")
    times = interleaved({"reference": backward(reference), "ours": backward(ours)}, rounds)
    print_row("sampling fwd+bwd", times["reference"], times["ours"], "")


def module_rows(inputs, rounds, device, bf16_skip):
    config = DeformableDetrConfig(d_model=D_MODEL, num_feature_levels=len(SHAPES))
    theirs = randomize_(DeformableDetrMultiscaleDeformableAttention(config, num_heads=HEADS, n_points=POINTS))
    ours = DetrCustomDeformableAttention(D_MODEL, HEADS, len(SHAPES), POINTS)
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.to(device).eval(), ours.to(device).eval()

    def reference():
        return theirs(inputs["query"], attention_mask=inputs["mask"], encoder_hidden_states=inputs["value"],
                      reference_points=inputs["boxes"], spatial_shapes=inputs["shapes"], spatial_shapes_list=SHAPES,
                      level_start_index=inputs["level_start_index"])[0]

    def run_ours():
        return ours(inputs["query"], inputs["boxes"], inputs["value"], SHAPES, value_mask=inputs["mask"])[0]

    def backward(function):
        def run():
            theirs.zero_grad(), ours.zero_grad()
            function().square().sum().backward()
        return synchronized(run, device)

    with torch.no_grad():
        expected, actual = reference(), run_ours()
        times = interleaved({"reference": synchronized(reference, device), "ours": synchronized(run_ours, device)},
                            rounds)
    print_row("module fwd", times["reference"], times["ours"], f"max |diff| {(expected - actual).abs().max():.1e}")
    times = interleaved({"reference": backward(reference), "ours": backward(run_ours)}, rounds)
    print_row("module fwd+bwd", times["reference"], times["ours"], "")
    if bf16_skip is not None and device.type == "cpu":
        print(f"{'module fwd bf16':<24} {bf16_skip}")
    else:
        def autocast(function):
            def run():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return function()
            return synchronized(run, device)

        with torch.no_grad():
            scale = expected.abs().max()
            reference_diff = (autocast(reference)().float() - expected).abs().max() / scale
            ours_diff = (autocast(run_ours)().float() - actual).abs().max() / scale
            times = interleaved({"reference": autocast(reference), "ours": autocast(run_ours)}, rounds)
        print_row("module fwd bf16", times["reference"], times["ours"],
                  f"vs fp32: transformers {reference_diff:.1e}, ours {ours_diff:.1e} (relative)")
    with torch.no_grad():
        projection = interleaved({"value_proj": synchronized(lambda: ours.value_proj(inputs["value"]), device),
                                  "module": synchronized(run_ours, device)}, rounds)
    print(f"value_proj share of our module fwd: {projection['value_proj'] / projection['module'] * 100:.0f} %")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per row")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(format_machine(describe_machine(args.threads)))
    print(f"device {device}; levels {SHAPES}, d_model {D_MODEL}, {HEADS} heads, {POINTS} points, {QUERIES} queries, "
          f"batch {BATCH}, box references, {args.rounds} interleaved rounds")
    print(f"{'row':<24} {'transformers ms':>9} {'ours ms':>9} {'ratio':>7}  diff")
    inputs = make_inputs(device)
    sampling_rows(inputs, args.rounds, device)
    module_rows(inputs, args.rounds, device, bf16_skip_reason())


if __name__ == "__main__":
    main()
