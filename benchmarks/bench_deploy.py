"""Deployed runtimes side by side: transformers' eager RT-DETRv2, ours eager, our ONNX export in ONNX Runtime, and
the OpenVINO IR in fp32 and at OpenVINO's default precision, on the same weights.

    .venv/bin/python -m benchmarks.bench_deploy [--size 640] [--rounds 5] [--threads 1] [--models r18]

The model is bench_rt_detr.py's: a transformers RT-DETRv2 (ResNet-vd, 80 classes, 300 queries) with random weights,
saved and loaded into ours through `from_pretrained`, then exported by deploy/export.py (dynamic batch and size,
checked against PyTorch). One image at size x size, no padding; median milliseconds over interleaved rounds, the
speed against transformers' eager, and the largest box difference from ours eager (cx, cy, w, h in [0, 1]) with
whether the 100 best (query, class) pairs are the same.
"""
import argparse
import tempfile
from pathlib import Path

import torch
import transformers

from benchmarks.bench_model import interleaved
from benchmarks.bench_rt_detr import MODELS, best_pairs, build_pair
from benchmarks.machine import describe_machine, format_machine
from deploy.export import export_onnx, onnx_to_openvino
from deploy.exported import load_onnx, load_openvino
from modeling_detr_custom import DetrCustomImageProcessor


def rows_for(name: str, folder: Path, size: int, rounds: int, threads: int) -> list[tuple]:
    reference, ours = build_pair(name, folder)
    processor = DetrCustomImageProcessor(size={"height": size, "width": size}, do_normalize=False)
    onnx_file = export_onnx(ours, processor, folder / "model.onnx")
    xml = onnx_to_openvino(onnx_file, folder / "model.xml")
    runners = {"onnxruntime": load_onnx(onnx_file, threads=threads).forward,
               "openvino fp32": load_openvino(xml, threads=threads).forward,
               "openvino default": load_openvino(xml, threads=threads, precision="default").forward}
    pixel_values = torch.randn((1, 3, size, size), generator=torch.Generator().manual_seed(1))
    pixel_mask = torch.ones((1, size, size), dtype=torch.long)
    functions = {"transformers eager": lambda: reference(pixel_values=pixel_values),
                 "ours eager": lambda: ours(pixel_values, pixel_mask=pixel_mask),
                 **{key: (lambda run=run: run(pixel_values=pixel_values, pixel_mask=pixel_mask))
                    for key, run in runners.items()}}
    with torch.no_grad():
        outputs = {key: function() for key, function in functions.items()}
        times = interleaved(functions, rounds)
    expected = outputs["ours eager"]
    rows = []
    for key, output in outputs.items():
        boxes = output["pred_boxes"] if isinstance(output, dict) else output.pred_boxes
        logits = output["logits"] if isinstance(output, dict) else output.logits
        got = type("Outputs", (), {"logits": logits})
        same = all(torch.equal(a, b) for a, b in zip(best_pairs(expected, 100)[:2], best_pairs(got, 100)[:2]))
        rows.append((f"RT-DETRv2-{name.upper()}vd {key}", times[key], times["transformers eager"] / times[key],
                     (boxes.float() - expected.pred_boxes).abs().max().item(), same))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="threads of every runtime (torch intra-op too)")
    parser.add_argument("--models", default="r18", help=f"comma-separated, of {sorted(MODELS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    print(format_machine(describe_machine()))
    print(f"one {args.size} x {args.size} image, {args.rounds} interleaved rounds, {args.threads} thread(s) each")
    print(f"{'model / runtime':<42} {'ms':>8} {'vs transformers':>16} {'boxes diff':>11} {'top-100':>8}")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as folder:
            rows = rows_for(name, Path(folder), args.size, args.rounds, args.threads)
            for label, seconds, speed, boxes, same in rows:
                print(f"{label:<42} {1000 * seconds:>8.1f} {speed:>15.2f}x {boxes:>11.1e} "
                      f"{'equal' if same else 'DIFFER':>8}")


if __name__ == "__main__":
    main()
