"""Seconds per training step of each detector of the real-data benchmark, measured one after the other.

    .venv/bin/python -m benchmarks.bench_real_speed [--steps 12] [--threads 1]

bench_real's runs can share the CPU with other work, which makes their "train s" hard to compare; this measures
every detector under the same conditions, in turn: bench_real's data, batch and sizes, `--threads` torch threads,
the first 2 steps untimed. Ours through the training script (the rate of its logged steps), torchvision's here.
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import bench_real
from benchmarks.machine import describe_machine, format_machine

SETTINGS = {"batch_size": 8, "scales": [112, 128, 144], "eval_size": 128, "max_size": 224, "seed": 42}


def cnn_seconds_per_step(name: str, files: dict, steps: int) -> float:
    train, categories = bench_real.load_split(*files["train"])
    model = bench_real.build_cnn(name, len(categories), SETTINGS["scales"], SETTINGS["eval_size"],
                                 SETTINGS["max_size"])
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    offset = 1 if name == "fasterrcnn" else 0
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        batch = [train[i] for i in rng.permutation(len(train))[:SETTINGS["batch_size"]]]
        images = [torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255 for _, pixels, _, _ in batch]
        targets = [{"boxes": torch.from_numpy(boxes.copy()).reshape(-1, 4),
                    "labels": torch.full((len(boxes),), offset, dtype=torch.int64)} for _, _, boxes, _ in batch]
        started = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return float(np.mean(times[2:]))


def detr_seconds_per_step(name: str, files: dict, steps: int, folder: Path) -> float:
    config = bench_real.detr_config(name, files, folder, steps=steps, **SETTINGS)
    config.update(logging_steps=1, eval_steps=steps)
    bench_real.run_training_script(config, folder)
    history = json.loads((folder / "run" / "metrics.json").read_text())["train_history"]
    first, last = history[1], history[-1]   # from the end of step 2
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--detectors", default="detr-demo,detr-rtdetr,detr-small,fasterrcnn,retinanet,fcos")
    parser.add_argument("--output-dir", default="outputs/bench_real_speed")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)   # the training script's process
    torch.set_num_threads(args.threads)
    from benchmarks.real_data import ensure

    output = Path(args.output_dir)
    files = bench_real.subset(ensure(), output / "data", None, None)
    print(format_machine(describe_machine()), flush=True)
    rates = {}
    for name in [n.strip() for n in args.detectors.split(",") if n.strip()]:
        if name in bench_real.DETR_PRESETS:
            rates[name] = detr_seconds_per_step(name, files, args.steps, output / name)
        else:
            rates[name] = cnn_seconds_per_step(name, files, args.steps)
        print(f"| {name} | {rates[name]:.2f} |", flush=True)
    (output / "speed.json").write_text(json.dumps(rates, indent=1))
    return rates


if __name__ == "__main__":
    main()
