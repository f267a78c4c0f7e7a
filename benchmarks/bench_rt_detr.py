"""Our RT-DETR layout vs transformers' RTDetrV2ForObjectDetection, same weights, timed side by side.

    .venv/bin/python -m benchmarks.bench_rt_detr [--quick] [--rounds 5] [--threads N] [--models r18,r50]

Each model is one transformers RT-DETRv2 with its ResNet-vd and random weights (`randomize_` from
modeling_detr_custom/testing_utils.py, the backbone's BatchNorm variances x4: with randomize_'s alone the activations
reach 1e4 at 640 x 640 and the query selection's top-k ranks by rounding; with transformers' init the memory is
nearly constant and the same happens), saved with save_pretrained and loaded into ours through the public
`from_pretrained`, which converts it (checkpoint_conversion_rt_detr.py). Runs are interleaved (transformers, ours,
...); the table shows median milliseconds, the speed ratio (transformers / ours) and how far the outputs are apart.

Rows per model (640 x 640, RT-DETR's size; --quick: 320 x 320 and fewer rounds):
  inference fp32 b1    eval, no grad; ours folds the frozen backbone BatchNorm and the hybrid encoder's BatchNorm
                       and RepVGG branches into convolutions (the folded weights cached while unchanged); diff = the
                       decoder memory's largest difference relative to its largest value, max |logits| and
                       |pred_boxes| differences, and whether the 100 best (query, class) pairs are the same. Random
                       weights spread the proposal scores thinly: a memory equal to rounding can still swap a
                       near-tie at the 300th place of the query selection, and then every output moves
  inference bf16 b1    ours under torch.autocast("cpu", torch.bfloat16) vs transformers in fp32; diff = the largest
                       box difference (px) among the 5 best pairs and whether their labels agree. Skipped where bf16
                       is emulated (`cpu_bf16_support`)
Models: r18 = RT-DETRv2-R18vd (3 decoder layers, fusion width 0.5), r50 = RT-DETRv2-R50vd (6 layers), 80 classes,
300 queries, as the released PekingU/rtdetr_v2_r18vd and _r50vd.
"""
import argparse
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import RTDetrResNetConfig, RTDetrV2Config, RTDetrV2ForObjectDetection

from benchmarks.bench_model import Row, bf16_skip_reason, counted, interleaved, print_header, print_rows
from benchmarks.machine import describe_machine
from modeling_detr_custom import DetrCustomForObjectDetection
from modeling_detr_custom.box_ops import box_cxcywh_to_xyxy
from modeling_detr_custom.testing_utils import randomize_

MODELS = {
    "r18": (dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
            dict(decoder_layers=3, hidden_expansion=0.5)),
    "r50": (dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048]), {}),
}


def build_pair(name: str, folder: Path):
    """(transformers RTDetrV2ForObjectDetection, ours converted from its saved folder), both in eval mode."""
    backbone, fields = MODELS[name]
    torch.manual_seed(0)
    config = RTDetrV2Config(backbone_config=RTDetrResNetConfig(out_indices=[2, 3, 4], **backbone),
                            encoder_in_channels=backbone["hidden_sizes"][1:], num_labels=80, **fields)
    reference = RTDetrV2ForObjectDetection(config).eval()
    randomize_(reference)
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if name.endswith("n_points_scale"):      # derived from the config (1 / points), not a weight
                buffer.fill_(1 / config.decoder_n_points)
            elif name.endswith("running_var") and ".backbone." in name:
                buffer.mul_(4.0)                     # keeps the backbone's activations O(1) (see the docstring)
    reference.save_pretrained(folder)
    return reference, DetrCustomForObjectDetection.from_pretrained(folder).eval()


def best_pairs(outputs, k: int):
    """(query, class) indices of the k best sigmoid scores, as RT-DETR's post-processing ranks them; scores."""
    scores = outputs.logits[0].float().sigmoid().flatten()             # [queries * classes]
    top = scores.topk(k)
    classes = outputs.logits.shape[-1]
    return top.indices // classes, top.indices % classes, top.values


def rows_for(name: str, reference, ours, size: int, rounds: int, bf16_skip: str | None) -> list[Row]:
    pixel_values = torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(1))

    def run_ours_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ours(pixel_values)

    functions = {"reference": lambda: reference(pixel_values=pixel_values), "ours": lambda: ours(pixel_values)}
    if bf16_skip is None:
        functions["bf16"] = run_ours_bf16
    with torch.no_grad():
        outputs, flops = {}, {}
        for key, function in functions.items():
            outputs[key], flops[key] = counted(function)
        times = interleaved(functions, rounds)
    expected, actual = outputs["reference"], outputs["ours"]
    with torch.no_grad():   # their decoder's memory: the encoder's maps through decoder_input_proj, flattened
        memory = torch.cat([projection(level).flatten(2).transpose(1, 2) for projection, level in zip(
            reference.model.decoder_input_proj, expected.encoder_last_hidden_state)], 1)
    memory_diff = ((memory - actual.encoder_last_hidden_state).abs().max() / memory.abs().max()).item()
    logits = (expected.logits - actual.logits).abs().max().item()
    boxes = (expected.pred_boxes - actual.pred_boxes).abs().max().item()
    same = all(torch.equal(a, b) for a, b in zip(best_pairs(expected, 100)[:2], best_pairs(actual, 100)[:2]))
    # where the memory agrees to rounding but the outputs do not, the query selection's top-k met a near-tie
    label = f"RT-DETRv2-{name.upper()}vd"
    rows = [Row(f"{label} inference fp32 b1 {size}x{size}", times["reference"], times["ours"],
                f"memory {memory_diff:.0e} rel, logits {logits:.1e}, boxes {boxes:.1e}, top-100 "
                f"{'equal' if same else 'DIFFER'}", flops["reference"], flops["ours"])]
    if bf16_skip is not None:
        return rows + [Row(f"{label} inference bf16 b1 {size}x{size}", None, None, bf16_skip)]
    queries, classes, _ = best_pairs(actual, 5)
    scale = torch.tensor([size, size, size, size])
    fp32_boxes = box_cxcywh_to_xyxy(actual.pred_boxes[0, queries]) * scale
    bf16 = outputs["bf16"]
    bf16_boxes = box_cxcywh_to_xyxy(bf16.pred_boxes[0, queries].float()) * scale
    same_labels = torch.equal(bf16.logits[0, queries].float().argmax(-1), actual.logits[0, queries].argmax(-1))
    box_px = (fp32_boxes - bf16_boxes).abs().max().item()
    return rows + [Row(f"{label} ours bf16 vs their fp32 b1 {size}x{size}", times["reference"], times["bf16"],
                       f"top-5 labels {'equal' if same_labels else 'DIFFER'}, boxes {box_px:.2f} px",
                       flops["reference"], flops["bf16"], bf16=True)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="320x320 images and 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per row (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--models", default="r18,r50", help=f"comma-separated, of {sorted(MODELS)}")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    size = 320 if args.quick else 640
    rounds = args.rounds or (3 if args.quick else 5)
    machine = describe_machine()
    print(f"RT-DETRv2 (transformers) vs ours converted, its own random init, {rounds} interleaved rounds, "
          f"torch threads {torch.get_num_threads()}")
    print_header(machine)
    for name in models:
        with tempfile.TemporaryDirectory() as folder:
            reference, ours = build_pair(name, Path(folder))
            print_rows(rows_for(name, reference, ours, size, rounds, bf16_skip_reason()), machine)
            del reference, ours


if __name__ == "__main__":
    main()
