"""Deployed runtimes side by side: transformers' eager model, ours eager, our ONNX export in ONNX Runtime, and the
OpenVINO IR in fp32 (and `fp32_winograd`: exported with `--winograd`, also timed in ONNX Runtime), bf16 and int8
(every convolution and matrix multiplication but the depthwise ones; and `int8_transformer`: the matrix
multiplications only), on the same weights, with one thread and with all cores.

    .venv/bin/python -m benchmarks.bench_deploy [--models r18,r50,detr_r50] [--threads 1,all] [--rounds 5]
                                                [--precisions fp32,bf16,int8] [--quick]
    .venv/bin/python -m benchmarks.bench_deploy --trained outputs/demo/best --exported demo.xml demo_int8.xml

Models (random weights, transformers' classes saved and loaded into ours through `from_pretrained`, which converts,
then exported by deploy/export.py: dynamic batch and size, checked against PyTorch):
- r18 / r50: RT-DETRv2 with ResNet18-vd / ResNet50-vd (80 classes, 300 queries), one 640 x 640 image;
- detr_r50: DETR with timm's ResNet-50 (91 classes, 100 queries), one 800 x 1066 image.
int8: NNCF post-training quantization (deploy/export.py's), calibrated here on a few random images: its speed is
the trained model's, its outputs are not (the demo model's AP per precision is in docs/deploy.md).

Per model and thread count: median milliseconds over interleaved rounds (load from other processes hits every
runtime alike), the speed against transformers' eager, the largest box difference from ours eager (cx, cy, w, h in
[0, 1]) and whether the 100 best (query, class) pairs by sigmoid score are the same (RT-DETR's ranking; DETR's
softmax logits have near ties there, so its boxes column is the comparison). The last lines are the README / docs
table: speed ratios against transformers' eager.

--trained: a trained folder (ours eager, at its processor's size) against files exported from it, e.g. an int8 file
made with accuracy control (`--int8_max_ap_drop`, whose AP needs trained weights): the files' speed against the
eager model, and the AP figures their metadata records.
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers

from benchmarks.bench_model import build_pair as build_detr_pair
from benchmarks.bench_model import interleaved
from benchmarks.bench_rt_detr import best_pairs
from benchmarks.bench_rt_detr import build_pair as build_rt_detr_pair
from benchmarks.machine import describe_machine, format_machine
from deploy.export import export_onnx, onnx_to_openvino, quantize_int8
from deploy.exported import load_onnx, load_openvino
from deploy.winograd import winograd_onnx
from modeling_detr_custom import DetrCustomImageProcessor

# name -> (label, height, width)
MODELS = {"r18": ("RT-DETRv2 R18vd", 640, 640), "r50": ("RT-DETRv2 R50vd", 640, 640),
          "detr_r50": ("DETR R50", 800, 1066)}
# the rows' OpenVINO files: name -> (precision it is compiled at, int8 scope or None for an fp32 file);
# int8_transformer: `--int8_scope transformer` (the convolutions in fp32); fp32_winograd: exported with --winograd
PRECISIONS = {"fp32": ("fp32", None), "fp32_winograd": ("fp32", None), "bf16": ("bf16", None),
              "int8": ("int8", "full"), "int8_transformer": ("int8", "transformer")}


def build(name: str, folder: Path):
    """(transformers' model, ours converted from its saved folder, ours' processor at the model's size)."""
    label, height, width = MODELS[name]
    if name == "detr_r50":
        # BatchNorm variances x4: activations O(1) through 16 random blocks (bench_model.py's `trainable`)
        reference, ours = build_detr_pair(folder, trainable=True)
        processor = DetrCustomImageProcessor(size={"height": height, "width": width})
    else:
        reference, ours = build_rt_detr_pair(name, folder)
        processor = DetrCustomImageProcessor(size={"height": height, "width": width}, do_normalize=False)
    return reference.eval(), ours.eval(), processor


def calibration_folder(folder: Path, count: int, height: int, width: int) -> Path:
    """`count` random pictures (the int8 speed does not depend on what calibrates it)."""
    images = folder / "calibration"
    images.mkdir(exist_ok=True)
    generator = np.random.default_rng(0)
    for index in range(count):
        pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(images / f"{index}.png")
    return images


def thread_counts(text: str) -> list[int]:
    cores = len(os.sched_getaffinity(0))
    return [cores if item == "all" else int(item) for item in text.split(",")]


def rows_for(name: str, folder: Path, threads: list[int], rounds: int, precisions: list[str],
             calibration_size: int) -> dict[int, list[tuple]]:
    """{threads: [(runtime, seconds, speed vs transformers, box difference, same 100 best pairs)]}."""
    label, height, width = MODELS[name]
    started = time.perf_counter()
    reference, ours, processor = build(name, folder)
    onnx_file = export_onnx(ours, processor, folder / "model.onnx")
    xml = onnx_to_openvino(onnx_file, folder / "model.xml")
    files = {"fp32": xml, "bf16": xml}
    if "fp32_winograd" in precisions:
        shutil.copyfile(onnx_file, folder / "winograd.onnx")
        print(f"{winograd_onnx(folder / 'winograd.onnx')} convolutions rewritten to Winograd F(4x4, 3x3)")
        files["fp32_winograd"] = onnx_to_openvino(folder / "winograd.onnx", folder / "winograd.xml")
    quantized = [precision for precision in precisions if PRECISIONS[precision][1] is not None]
    images = calibration_folder(folder, calibration_size, height, width) if quantized else None
    for precision in quantized:
        files[precision] = quantize_int8(xml, folder / f"{precision}.xml", processor, str(images),
                                         calibration_size=calibration_size, scope=PRECISIONS[precision][1])
    print(f"{label}: built, exported and quantized in {time.perf_counter() - started:.0f} s", flush=True)
    pixel_values = torch.randn((1, 3, height, width), generator=torch.Generator().manual_seed(1))
    pixel_mask = torch.ones((1, height, width), dtype=torch.long)
    table = {}
    for count in threads:
        torch.set_num_threads(count)
        runners = {"onnxruntime": load_onnx(onnx_file, threads=count).forward}
        if "fp32_winograd" in precisions:
            runners["onnxruntime winograd"] = load_onnx(folder / "winograd.onnx", threads=count).forward
        for precision in precisions:
            runners[f"openvino {precision}"] = load_openvino(files[precision], threads=count,
                                                             precision=PRECISIONS[precision][0]).forward
        # transformers' RT-DETR takes no mask (one fixed size); its DETR takes one
        masks = {"pixel_mask": pixel_mask} if name == "detr_r50" else {}
        functions = {"transformers eager": lambda: reference(pixel_values=pixel_values, **masks),
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
            rows.append((key, times[key], times["transformers eager"] / times[key],
                         (boxes.float() - expected.pred_boxes).abs().max().item(), same))
        table[count] = rows
    return table


def trained_rows(folder: str, files: list[str], threads: list[int], rounds: int,
                 picture_size: tuple[int, int]) -> dict[int, list[tuple]]:
    """A trained folder's eager model (ours) against its exported files, each run at the precision it was exported
    for (e.g. an accuracy-controlled int8 file, whose AP is in its metadata), on one random picture of
    `picture_size` (height, width) resized by the folder's processor: {threads: [(runtime, seconds, speed vs ours
    eager)]}."""
    from deploy.export import accuracy_control_record
    from deploy.runtimes import load_detector, model_inputs

    eager = load_detector(folder)
    picture = np.random.default_rng(0).integers(0, 256, (*picture_size, 3), dtype=np.uint8)
    pixel_values, pixel_mask = model_inputs(eager.processor, [picture])
    print(f"{folder}: one picture of {picture_size[0]}x{picture_size[1]} pre-processed to "
          f"{pixel_values.shape[2]}x{pixel_values.shape[3]}")
    for file in files:
        control = accuracy_control_record(Path(file)) if file.endswith(".xml") else {}
        if control:
            print(f"  {file}: int8 AP {control['int8_AP']:.4f} vs fp32 {control['fp32_AP']:.4f}, "
                  f"{control['reverted_operations']} of {control['quantized_operations']} operations in fp32")
    table = {}
    for count in threads:
        torch.set_num_threads(count)
        functions = {"ours eager": lambda: eager.forward(pixel_values=pixel_values, pixel_mask=pixel_mask)}
        for file in files:
            detector = load_detector(file, threads=count)
            functions[f"{Path(file).name} ({detector.runtime})"] = (
                lambda run=detector.forward: run(pixel_values=pixel_values, pixel_mask=pixel_mask))
        with torch.no_grad():
            times = interleaved(functions, rounds)
        table[count] = [(key, seconds, times["ours eager"] / seconds) for key, seconds in times.items()]
    return table


def ratio_table(results: dict, threads: list[int]) -> str:
    """The README / docs table: speed against transformers' eager, one column per (model, threads)."""
    columns = [(name, count) for name in results for count in threads]
    runtimes = [row[0] for row in next(iter(results.values()))[threads[0]]]
    header = "| runtime | " + " | ".join(
        f"{MODELS[name][0]} {MODELS[name][1]}x{MODELS[name][2]}, {count} thread{'s' if count > 1 else ''}"
        for name, count in columns) + " |"
    lines = [header, "|---|" + "---|" * len(columns)]
    for index, runtime in enumerate(runtimes):
        cells = []
        for name, count in columns:
            _, seconds, speed, _, _ = results[name][count][index]
            cells.append(f"{speed:.2f}x ({1000 * seconds:.0f} ms)")
        lines.append(f"| {runtime} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="r18,r50,detr_r50", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--threads", default="1,all", help="comma-separated thread counts; 'all': every core")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help=f"OpenVINO precisions to time, of {tuple(PRECISIONS)}")
    parser.add_argument("--calibration_size", type=int, default=8, help="random pictures calibrating int8")
    parser.add_argument("--quick", action="store_true", help="r18 only, 3 rounds (checks the script runs)")
    parser.add_argument("--size", help="HEIGHTxWIDTH for every model instead of its own (quick checks)")
    parser.add_argument("--trained", help="instead of the random-weight models: a trained folder, timed eager "
                                          "against its exported files (--exported)")
    parser.add_argument("--exported", nargs="+", default=[], help="with --trained: its .onnx / .xml files")
    parser.add_argument("--picture_size", default="480x640",
                        help="with --trained: HEIGHTxWIDTH of the picture before the folder's processor resizes it")
    args = parser.parse_args(argv)
    if bool(args.trained) != bool(args.exported):
        parser.error("--trained FOLDER and --exported FILE [FILE ...] go together.")
    if args.trained:
        threads = thread_counts(args.threads)
        print(format_machine(describe_machine()))
        picture_size = tuple(int(side) for side in args.picture_size.split("x"))
        for count, rows in trained_rows(args.trained, args.exported, threads, args.rounds, picture_size).items():
            print(f"\n{count} thread(s), median of {args.rounds} interleaved rounds")
            print(f"{'runtime':<52} {'ms':>9} {'vs ours eager':>14}")
            for key, seconds, speed in rows:
                print(f"{key:<52} {1000 * seconds:>9.2f} {speed:>13.2f}x", flush=True)
        return
    if args.size:
        height, width = (int(side) for side in args.size.split("x"))
        for name, (label, _, _) in MODELS.items():
            MODELS[name] = (label, height, width)
    if args.quick:
        args.models, args.rounds = "r18", 3
    threads = thread_counts(args.threads)
    precisions = args.precisions.split(",")
    if unknown := [precision for precision in precisions if precision not in PRECISIONS]:
        parser.error(f"unknown precision(s) {unknown}: choose from {', '.join(PRECISIONS)}.")
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    print(format_machine(describe_machine()))
    print(f"one image per call, {args.rounds} interleaved rounds, threads {threads} (every runtime and torch)")
    results = {}
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as folder:
            results[name] = rows_for(name, Path(folder), threads, args.rounds, precisions, args.calibration_size)
        label, height, width = MODELS[name]
        for count, rows in results[name].items():
            print(f"\n{label} {height}x{width}, {count} thread(s)")
            print(f"{'runtime':<22} {'ms':>9} {'vs transformers':>16} {'boxes diff':>11} {'top-100':>8}")
            for key, seconds, speed, boxes, same in rows:
                print(f"{key:<22} {1000 * seconds:>9.1f} {speed:>15.2f}x {boxes:>11.1e} "
                      f"{'equal' if same else 'DIFFER':>8}", flush=True)
    print("\nSpeed against transformers' eager model (median ms):\n")
    print(ratio_table(results, threads))
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
