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
                         box difference (px) among the top-5 detections, which must carry the same labels
  train step fp32 b2     forward + loss + backward + AdamW step, dropout off; diff = relative loss difference
  loss b8 x 100 x 20     matching + loss alone, 6 decoder layers with auxiliary loss; diff = relative difference
  batch composition      not timed: an image alone vs padded in a batch with a larger image (see `batch_rows`)
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import DetrConfig, DetrForObjectDetection
from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

from modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomLoss
from modeling_detr_custom.box_ops import box_cxcywh_to_xyxy
from modeling_detr_custom.testing_utils import randomize_  # the tests' meaningful random weights

NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


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


def inference_rows(reference, ours, height: int, width: int, rounds: int) -> list[tuple]:
    reference.eval(), ours.eval()
    pixel_values = torch.randn((1, 3, height, width), generator=torch.Generator().manual_seed(1))

    def run_reference():
        return reference(pixel_values=pixel_values)

    def run_ours():
        return ours(pixel_values)

    def run_ours_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ours(pixel_values)

    with torch.no_grad():
        expected, actual, bf16 = run_reference(), run_ours(), run_ours_bf16()
        times = interleaved({"reference": run_reference, "ours": run_ours, "bf16": run_ours_bf16}, rounds)
    diff = max((expected.logits - actual.logits).abs().max().item(),
               (expected.pred_boxes - actual.pred_boxes).abs().max().item())
    fp32_labels, fp32_boxes, queries = top_detections(actual, height, width)
    bf16_labels, bf16_boxes, _ = top_detections(bf16, height, width, queries)
    same_labels = torch.equal(fp32_labels, bf16_labels)
    box_px = (fp32_boxes - bf16_boxes).abs().max().item()
    return [
        (f"inference fp32 b1 {height}x{width}", times["reference"], times["ours"], f"{diff:.1e}"),
        (f"inference bf16 b1 {height}x{width}", times["reference"], times["bf16"],
         f"top-5 labels {'equal' if same_labels else 'DIFFER'}, boxes {box_px:.2f} px"),
    ]


def train_row(reference, ours, batch: int, height: int, width: int, rounds: int) -> tuple:
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

    times = interleaved({"reference": run_reference, "ours": run_ours}, rounds)
    diff = abs(losses["ours"] - losses["reference"]) / abs(losses["reference"])
    # the share of matching + loss in our step: the criterion alone, on this step's outputs (with gradients)
    outputs = ours(pixel_values)
    auxiliary = [{"logits": a["logits"], "pred_boxes": a["pred_boxes"]} for a in outputs.auxiliary_outputs]
    criterion = interleaved({"loss": lambda: ours.criterion(outputs.logits, outputs.pred_boxes, labels, auxiliary)},
                            rounds)["loss"]
    return (f"train step fp32 b{batch} {height}x{width}", times["reference"], times["ours"],
            f"rel {diff:.1e}; matching + loss {criterion / times['ours'] * 100:.2f} % of the step")


def loss_row(rounds: int, batch: int = 8, queries: int = 100, targets: int = 20, layers: int = 6) -> tuple:
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
    return (f"loss b{batch} x {queries}q x {targets}t, {layers} layers", times["reference"], times["ours"],
            f"rel {diff:.1e}")


def batch_rows(reference, ours, height: int, width: int, rounds: int) -> list[tuple]:
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
        times = interleaved({"default": lambda: ours(pixel_values, pixel_mask),
                             "independent": lambda: ours(pixel_values, pixel_mask, batch_independent=True)}, rounds)
    return [
        ("batch composition: transformers", None, None, f"{reference_diff:.1e}"),
        ("batch composition: ours default", None, None, f"{ours_diff:.1e}"),
        (f"ours b2 default vs batch_independent ({height}x{width} + {small_height}x{small_width})",
         times["default"], times["independent"], f"{independent_diff:.1e}"),
    ]


def print_header() -> None:
    print(f"{'':62s} {'transformers ms':>15s} {'ours ms':>9s} {'ratio':>6s}  max abs diff", flush=True)


def print_rows(rows: list[tuple]) -> None:
    for name, reference_s, ours_s, diff in rows:
        if reference_s is None:
            print(f"{name:62s} {'':>15s} {'':>9s} {'':>6s}  {diff}", flush=True)
        else:
            print(f"{name:62s} {reference_s * 1e3:15.1f} {ours_s * 1e3:9.1f} {reference_s / ours_s:5.2f}x  {diff}",
                  flush=True)


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
    print(f"R50, random weights (randomize_), {rounds} interleaved rounds, torch threads {torch.get_num_threads()}")
    print_header()
    with tempfile.TemporaryDirectory() as folder:
        reference, ours = build_pair(Path(folder) / "eval")
        print_rows(inference_rows(reference, ours, height, width, rounds))
        print_rows(batch_rows(reference, ours, height, width, rounds))
        del reference, ours
        reference, ours = build_pair(Path(folder) / "train", trainable=True, auxiliary_loss=True, **NO_DROPOUT)
        train = train_row(reference, ours, 2, height, width, rounds)
        print_rows([train])
        del reference, ours
    loss = loss_row(rounds * 3)
    print_rows([loss])
    print(f"matching + loss at batch 8 x 20 targets: {loss[2] / (4 * train[2]) * 100:.2f} % of 4 batch-2 training "
          "steps of ours (the same images)", flush=True)


if __name__ == "__main__":
    main()
