"""DetrCustomForObjectDetection vs transformers' DetrForObjectDetection, same weights, timed side by side.

    .venv/bin/python -m benchmarks.bench_model [--quick] [--rounds 5] [--threads N]

Both models come from one transformers model with random weights (`randomize_` from modeling_detr_custom/
testing_utils.py: default inits give near-constant outputs), saved with save_pretrained and loaded into ours through
the public `from_pretrained`, which converts. Runs are interleaved (transformers, ours, transformers, ...) so load
from other processes hits both alike; the table shows median milliseconds, the speed ratio (transformers / ours) and
the largest output difference.

Rows (R50, 800x1066 unless --quick: resnet18-sized images 384x512, fewer rounds):
  inference fp32 b1      eval, no grad; ours folds the frozen BatchNorm into the convolutions (a cached copy) and
                         runs the backbone channels_last; diff = max |logits| and |pred_boxes| differences
  inference bf16 b1      ours under torch.autocast("cpu", torch.bfloat16) vs transformers in fp32; diff = the largest
                         box difference (px) among the top-5 detections, which must carry the same labels. Skipped,
                         with the reason, where the CPU has no native bf16 (`cpu_bf16_support`): emulated bf16 runs
                         several times slower than fp32, and no user of ours would run it there
  train step fp32 b2     forward + loss + backward + AdamW step, dropout off; diff = relative loss difference
  loss b8 x 100 x 20     matching + loss alone, 6 decoder layers with auxiliary loss; diff = relative difference
  batch composition      not timed: an image alone vs padded in a batch with a larger image (see `batch_rows`)

GFLOP: the FLOPs of one call of each model, counted once (not timed) by torch's FLOP formulas (convolutions, matrix
products, attention; elementwise work and the optimizer are not counted; the train step counts forward + backward);
GFLOP/s = those FLOPs / the median time, next to the machine's peak estimate (benchmarks/machine.py).
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from transformers import DetrConfig, DetrForObjectDetection
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import conv_flop_count, flop_registry, sdpa_backward_flop, sdpa_flop
from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

from modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomLoss
from modeling_detr_custom.box_ops import box_cxcywh_to_xyxy
from modeling_detr_custom.fast_paths import cpu_bf16_support
from modeling_detr_custom.testing_utils import randomize_  # the tests' meaningful random weights

from benchmarks.machine import describe_machine, format_peak

NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def pointwise_convolution_flop(input, *args, out_val=None, **kwargs) -> int:
    """FLOPs of oneDNN's convolution with post-ops (our fused conv + ReLU at CPU inference): those of the
    convolution. Its weight is the second argument, or the third where the second is the tensor added."""
    weight = args[1] if args[1] is not None and args[1].ndim == 4 else args[0]
    return conv_flop_count(list(input.shape), list(weight.shape), list(out_val.shape), transposed=False)


# torch's FLOP formulas know the CUDA attention kernels; CPU SDPA runs this one, with the same FLOPs and argument
# order (the imported formulas are already wrapped to take tensors)
FLOP_FORMULAS = {
    **flop_registry,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop,
    torch.ops.mkldnn._convolution_pointwise: pointwise_convolution_flop,
}


class Row(NamedTuple):
    name: str
    reference_s: float | None          # median seconds of the left column (transformers, unless the name says)
    ours_s: float | None
    diff: str
    reference_flops: int | None = None  # FLOPs of one call, counted once
    ours_flops: int | None = None
    bf16: bool = False                  # GFLOP/s of ours against the bf16 peak


class _FlopCounter(TorchDispatchMode):
    """Sums `FLOP_FORMULAS` over the ops a call dispatches. torch's FlopCounterMode does the same plus per-module
    counts, whose autograd hooks fail on parameters passed between modules under no_grad."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def counted(function):
    """(`function()`, the FLOPs of that call: convolutions, matrix products, attention, by torch's FLOP formulas)."""
    with _FlopCounter() as counter:
        result = function()
    return result, counter.flops


def count_flops(function) -> int:
    return counted(function)[1]


def bf16_skip_reason() -> str | None:
    """None where this CPU computes bf16 natively; otherwise why the bf16 rows are skipped (`cpu_bf16_support`)."""
    native, why = cpu_bf16_support()
    return None if native else f"skipped: {why}"


def build_pair(folder: Path, trainable: bool = False, **config):
    """(transformers model, ours) with the same random weights; ours loaded through the public from_pretrained.

    `trainable`: BatchNorm variances x4 (each frozen BatchNorm halves instead of keeping its input's scale). With
    randomize_'s statistics the activations grow ~1.7x per block, to ~4e4 in the last stage, and the backward pass
    overflows into NaN gradients in both models; halved, they stay O(1) and an AdamW step is meaningful."""
    torch.manual_seed(0)
    reference = randomize_(DetrForObjectDetection(DetrConfig(use_pretrained_backbone=False, **config)))
    if trainable:
        with torch.no_grad():
            for name, buffer in reference.named_buffers():
                if name.endswith("running_var"):
                    buffer.mul_(4.0)
    reference.save_pretrained(folder)
    return reference, DetrCustomForObjectDetection.from_pretrained(folder)


def interleaved(functions: dict, rounds: int, warmup: int = 1) -> dict:
    """Median seconds per call of each function, calls interleaved A B A B ... after `warmup` rounds."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def random_labels(batch: int, num_targets: int, num_labels: int, generator: torch.Generator) -> list[dict]:
    centers = torch.rand((batch, num_targets, 2), generator=generator) * 0.6 + 0.2
    sizes = torch.rand((batch, num_targets, 2), generator=generator) * 0.3 + 0.05
    return [{"class_labels": torch.randint(0, num_labels, (num_targets,), generator=generator),
             "boxes": torch.cat([c, s], dim=1)} for c, s in zip(centers, sizes)]


def top_detections(outputs, height: int, width: int, queries: torch.Tensor | None = None, k: int = 5):
    """(labels, boxes in pixels x0 y0 x1 y1, query indices) of the k best-scoring queries, or of `queries`. By query
    rather than by rank: random weights give many tied scores, whose order means nothing."""
    scores, labels = outputs.logits[0].float().softmax(-1)[:, :-1].max(-1)               # [queries]
    queries = scores.topk(k).indices if queries is None else queries
    scale = torch.tensor([width, height, width, height])
    return labels[queries], box_cxcywh_to_xyxy(outputs.pred_boxes[0, queries].float()) * scale, queries


def inference_rows(reference, ours, height: int, width: int, rounds: int, bf16_skip: str | None = None) -> list[Row]:
    """fp32 inference, and ours under bf16 autocast unless `bf16_skip` (the reason, printed instead of a timing)."""
    reference.eval(), ours.eval()
    pixel_values = torch.randn((1, 3, height, width), generator=torch.Generator().manual_seed(1))

    def run_reference():
        return reference(pixel_values=pixel_values)

    def run_ours():
        return ours(pixel_values)

    def run_ours_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ours(pixel_values)

    functions = {"reference": run_reference, "ours": run_ours}
    if bf16_skip is None:
        functions["bf16"] = run_ours_bf16
    with torch.no_grad():
        outputs, flops = {}, {}
        for name, function in functions.items():
            outputs[name], flops[name] = counted(function)
        times = interleaved(functions, rounds)
    expected, actual = outputs["reference"], outputs["ours"]
    diff = max((expected.logits - actual.logits).abs().max().item(),
               (expected.pred_boxes - actual.pred_boxes).abs().max().item())
    rows = [Row(f"inference fp32 b1 {height}x{width}", times["reference"], times["ours"], f"{diff:.1e}",
                flops["reference"], flops["ours"])]
    if bf16_skip is not None:
        return rows + [Row(f"inference bf16 b1 {height}x{width}", None, None, bf16_skip)]
    fp32_labels, fp32_boxes, queries = top_detections(actual, height, width)
    bf16_labels, bf16_boxes, _ = top_detections(outputs["bf16"], height, width, queries)
    same_labels = torch.equal(fp32_labels, bf16_labels)
    box_px = (fp32_boxes - bf16_boxes).abs().max().item()
    return rows + [Row(f"inference bf16 b1 {height}x{width}", times["reference"], times["bf16"],
                       f"top-5 labels {'equal' if same_labels else 'DIFFER'}, boxes {box_px:.2f} px",
                       flops["reference"], flops["bf16"], bf16=True)]


def train_row(reference, ours, batch: int, height: int, width: int, rounds: int) -> Row:
    reference.train(), ours.train()
    # the original DETR trains layer2-4 of its ResNet only; so does ours (freeze_backbone_stem), and so would
    # transformers' DetrConvEncoder, but its freeze only runs for backbone model types named "resnet*", not timm's
    for name, parameter in reference.model.backbone.named_parameters():
        if not any(f"layer{i}." in name for i in (2, 3, 4)):
            parameter.requires_grad_(False)
    trainable = [sum(p.requires_grad for p in model.parameters()) for model in (reference, ours)]
    assert trainable[0] == trainable[1], f"different trainable parameter sets: {trainable}"
    generator = torch.Generator().manual_seed(2)
    pixel_values = torch.randn((batch, 3, height, width), generator=generator)
    labels = random_labels(batch, 8, reference.config.num_labels, generator)
    optimizers = {name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
                  for name, model in (("reference", reference), ("ours", ours))}
    losses = {}

    def step(name, model, call):
        loss = call(model)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad()
        losses.setdefault(name, loss.item())       # the first step, from the same weights: compared

    def run_reference():
        step("reference", reference, lambda m: m(pixel_values=pixel_values, labels=labels).loss)

    def run_ours():
        step("ours", ours, lambda m: m(pixel_values, labels=labels).loss)

    # the first step of each (counted, so forward + loss + backward; the AdamW update has no FLOP formula) is the one
    # whose losses are compared: both from the same weights
    flops = {"reference": count_flops(run_reference), "ours": count_flops(run_ours)}
    times = interleaved({"reference": run_reference, "ours": run_ours}, rounds)
    diff = abs(losses["ours"] - losses["reference"]) / abs(losses["reference"])
    # the share of matching + loss in our step: the criterion alone, on this step's outputs (with gradients)
    outputs = ours(pixel_values)
    auxiliary = [{"logits": a["logits"], "pred_boxes": a["pred_boxes"]} for a in outputs.auxiliary_outputs]
    criterion = interleaved({"loss": lambda: ours.criterion(outputs.logits, outputs.pred_boxes, labels, auxiliary)},
                            rounds)["loss"]
    return Row(f"train step fp32 b{batch} {height}x{width}", times["reference"], times["ours"],
               f"rel {diff:.1e}; matching + loss {criterion / times['ours'] * 100:.2f} % of the step",
               flops["reference"], flops["ours"])


def loss_row(rounds: int, batch: int = 8, queries: int = 100, targets: int = 20, layers: int = 6) -> Row:
    generator = torch.Generator().manual_seed(3)
    config = DetrConfig(num_labels=91, auxiliary_loss=True, decoder_layers=layers, use_pretrained_backbone=False)
    logits = torch.randn((layers, batch, queries, 92), generator=generator)
    boxes = torch.rand((layers, batch, queries, 4), generator=generator) * 0.5 + 0.25
    labels = random_labels(batch, targets, 91, generator)
    criterion = DetrCustomLoss(config)   # reads the same field names as our config

    def run_reference():
        return ForObjectDetectionLoss(logits[-1], labels, "cpu", boxes[-1], config, logits, boxes)[0]

    def run_ours():
        auxiliary = [{"logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])]
        return criterion(logits[-1], boxes[-1], labels, auxiliary)[0]

    diff = abs(run_ours().item() - run_reference().item()) / abs(run_reference().item())
    times = interleaved({"reference": run_reference, "ours": run_ours}, rounds)
    # no GFLOP/s: matching and loss are elementwise work and scipy's assignment, which no FLOP formula counts
    return Row(f"loss b{batch} x {queries}q x {targets}t, {layers} layers", times["reference"], times["ours"],
               f"rel {diff:.1e}")


def batch_rows(reference, ours, height: int, width: int, rounds: int) -> list[Row]:
    """An image alone vs the same image padded into a batch with a larger one. Time columns: the padded batch of 2
    in ours' default mode vs ours with `batch_independent=True` (its cost); diff: the image's output change."""
    reference.eval(), ours.eval()
    generator = torch.Generator().manual_seed(4)
    small_height, small_width = height * 3 // 4, width * 3 // 4
    pixel_values = torch.randn((2, 3, height, width), generator=generator)
    pixel_mask = torch.ones((2, height, width), dtype=torch.long)
    pixel_mask[1, small_height:], pixel_mask[1, :, small_width:] = 0, 0
    pixel_values[1][:, pixel_mask[1] == 0] = 0
    alone = pixel_values[1:, :, :small_height, :small_width]

    def difference(batched, single):
        return max((batched.logits[1] - single.logits[0]).abs().max().item(),
                   (batched.pred_boxes[1] - single.pred_boxes[0]).abs().max().item())

    with torch.no_grad():
        reference_diff = difference(reference(pixel_values=pixel_values, pixel_mask=pixel_mask),
                                    reference(pixel_values=alone))
        ours_alone = ours(alone)
        ours_diff = difference(ours(pixel_values, pixel_mask), ours_alone)
        independent_diff = difference(ours(pixel_values, pixel_mask, batch_independent=True), ours_alone)
        functions = {"default": lambda: ours(pixel_values, pixel_mask),
                     "independent": lambda: ours(pixel_values, pixel_mask, batch_independent=True)}
        flops = {name: count_flops(function) for name, function in functions.items()}
        times = interleaved(functions, rounds)
    return [
        Row("batch composition: transformers", None, None, f"{reference_diff:.1e}"),
        Row("batch composition: ours default", None, None, f"{ours_diff:.1e}"),
        Row(f"ours b2 default vs batch_independent ({height}x{width} + {small_height}x{small_width})",
            times["default"], times["independent"], f"{independent_diff:.1e}", flops["default"], flops["independent"]),
    ]


def print_header(machine: dict) -> None:
    print(format_peak(machine))
    print("GFLOP: one call, theirs/ours where they differ; GFLOP/s: theirs/ours; % peak: ours' GFLOP/s over the fp32 "
          "peak (the bf16 row: over the bf16 peak, though only the backbone runs in bf16)")
    print(f"{'':62s} {'transformers ms':>15s} {'ours ms':>9s} {'ratio':>6s} {'GFLOP':>11s} {'GFLOP/s':>9s} "
          f"{'% peak':>6s}  max abs diff", flush=True)


def format_flops(row: Row, machine: dict) -> tuple[str, str, str]:
    """(GFLOP, GFLOP/s, % of peak) cells of a row; empty where it has no FLOP count."""
    if row.ours_flops is None or row.ours_s is None:
        return "", "", ""
    gflop = f"{row.ours_flops / 1e9:.1f}"
    if abs(row.reference_flops - row.ours_flops) > 1e-3 * row.ours_flops:
        gflop = f"{row.reference_flops / 1e9:.1f}/{gflop}"
    rates = row.reference_flops / row.reference_s / 1e9, row.ours_flops / row.ours_s / 1e9
    peak = machine.get("peak_bf16_gflops" if row.bf16 else "peak_fp32_gflops")
    return gflop, f"{rates[0]:.0f}/{rates[1]:.0f}", f"{rates[1] / peak * 100:5.1f}%" if peak else ""


def print_rows(rows: list[Row], machine: dict) -> None:
    for row in rows:
        if row.reference_s is None:
            print(f"{row.name:62s} {'':>15s} {'':>9s} {'':>6s} {'':>11s} {'':>9s} {'':>6s}  {row.diff}", flush=True)
            continue
        gflop, rate, peak = format_flops(row, machine)
        print(f"{row.name:62s} {row.reference_s * 1e3:15.1f} {row.ours_s * 1e3:9.1f} "
              f"{row.reference_s / row.ours_s:5.2f}x {gflop:>11s} {rate:>9s} {peak:>6s}  {row.diff}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="384x512 images and 3 rounds (make bench)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per row (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    height, width = (384, 512) if args.quick else (800, 1066)
    rounds = args.rounds or (3 if args.quick else 7)
    machine = describe_machine()
    print(f"R50, random weights (randomize_), {rounds} interleaved rounds, torch threads {torch.get_num_threads()}")
    print_header(machine)
    with tempfile.TemporaryDirectory() as folder:
        reference, ours = build_pair(Path(folder) / "eval")
        print_rows(inference_rows(reference, ours, height, width, rounds, bf16_skip_reason()), machine)
        print_rows(batch_rows(reference, ours, height, width, rounds), machine)
        del reference, ours
        reference, ours = build_pair(Path(folder) / "train", trainable=True, auxiliary_loss=True, **NO_DROPOUT)
        train = train_row(reference, ours, 2, height, width, rounds)
        print_rows([train], machine)
        del reference, ours
    loss = loss_row(rounds * 3)
    print_rows([loss], machine)
    print(f"matching + loss at batch 8 x 20 targets: {loss.ours_s / (4 * train.ours_s) * 100:.2f} % of 4 batch-2 "
          "training steps of ours (the same images)", flush=True)


if __name__ == "__main__":
    main()
