"""What query groups (Group DETR, `num_query_groups`) cost per training step, on the demo-sized model.

    .venv/bin/python -m benchmarks.bench_query_groups [--groups 1 4 13] [--rounds 7] [--threads N]

The model of training/configs/demo_detr.yaml (resnet18 from scratch, trainable BatchNorm, d_model 128, 2 + 2 layers,
4 heads, FFN 256, 10 queries, auxiliary loss, dropout 0), a batch of 8 random 128 x 128 images with 1-4 objects of
3 classes each. One train step = forward + loss + backward + AdamW step; "loss" times the matching + loss alone on
the step's outputs (K matchings per decoder layer, scipy on the CPU). Rounds are interleaved (K = 1, 4, 13, 1, ...)
so that load from other processes hits every K alike; the table shows medians and the ratios to K = 1. Inference
is not timed: in eval mode only the first group runs (tests/test_query_groups.py checks it equals K = 1 exactly).
"""
import argparse
import statistics
import time

import torch

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection

from benchmarks.machine import describe_machine, format_machine

DEMO = dict(backbone="resnet18", use_pretrained_backbone=False, freeze_batch_norm=False, freeze_backbone_stem=False,
            d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=256, decoder_ffn_dim=256, num_queries=10, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, auxiliary_loss=True, num_labels=3)


def demo_batch(batch: int = 8, size: int = 128, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    labels = []
    for _ in range(batch):
        count = int(torch.randint(1, 5, (), generator=generator))
        centers = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.2 + 0.1
        labels.append({"class_labels": torch.randint(0, 3, (count,), generator=generator),
                       "boxes": torch.cat([centers, sizes], 1)})
    return pixel_values, labels


def step_timer(num_groups: int, pixel_values, labels):
    """A closure that runs one train step of a fresh demo model with `num_groups` groups and returns
    (step seconds, loss seconds)."""
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(DetrCustomConfig(**DEMO, num_query_groups=num_groups)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

    def step():
        start = time.perf_counter()
        outputs = model(pixel_values, labels=labels)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        optimizer.zero_grad()
        step_s = time.perf_counter() - start
        auxiliary = [{key: value.detach() for key, value in layer.items()} for layer in outputs.auxiliary_outputs]
        start = time.perf_counter()
        with torch.no_grad():
            model.criterion(outputs.logits.detach(), outputs.pred_boxes.detach(), labels, auxiliary,
                            num_query_groups=num_groups)
        return step_s, time.perf_counter() - start

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4, 13])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(format_machine(describe_machine(args.threads)), flush=True)
    pixel_values, labels = demo_batch()
    steps = {groups: step_timer(groups, pixel_values, labels) for groups in args.groups}
    times = {groups: [] for groups in args.groups}
    for round_index in range(args.warmup + args.rounds):
        for groups, step in steps.items():
            measured = step()
            if round_index >= args.warmup:
                times[groups].append(measured)
    base_step = statistics.median(s for s, _ in times[args.groups[0]])
    base_loss = statistics.median(loss for _, loss in times[args.groups[0]])
    print(f"\ndemo model, batch 8 x 128 px, train step median of {args.rounds} rounds "
          f"(ratios to K = {args.groups[0]})")
    print(f"{'K':>4} {'queries':>8} {'step ms':>9} {'ratio':>7} {'loss ms':>9} {'ratio':>7}")
    for groups in args.groups:
        step_s = statistics.median(s for s, _ in times[groups])
        loss_s = statistics.median(loss for _, loss in times[groups])
        print(f"{groups:>4} {groups * DEMO['num_queries']:>8} {1e3 * step_s:>9.1f} {step_s / base_step:>7.2f} "
              f"{1e3 * loss_s:>9.1f} {loss_s / base_loss:>7.2f}")


if __name__ == "__main__":
    main()
