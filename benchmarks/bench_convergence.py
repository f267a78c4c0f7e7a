"""Convergence at equal steps: the training levers of issue 14 against today's DETR, on the demo data.

    .venv/bin/python -m benchmarks.bench_convergence [--steps 1000] [--variants baseline,ema] [--quick]
                                                     [--base-config training/configs/demo_detr.yaml]
                                                     [--output-dir outputs/bench_convergence]

Each variant is the base config (the demo's by default) plus a few overrides (VARIANTS below), trained by the
training script in its own process (`python -m training.train`) for the same number of optimizer steps, with the
same seed and the time budget off (max_train_minutes 0, so that every variant gets the steps), then evaluated once at
the end with pycocotools (the script's own evaluation: metrics.json). One table: variant, AP, AP50, AR@100 on the
validation split, steps/s (training steps only: from the logged steps' clock, without data loading and evaluation),
and the wall time of the whole run (start, data, training, evaluation, saving). Printed, and written as markdown
(OUTPUT_DIR/convergence.md) with the machine and the command, for the README.

A variant whose config fields this checkout does not have fails before anything is trained, naming the field.
`--quick`: 50 steps (about a minute a variant on a quiet 2-core machine), to see that everything runs; the figures
only mean something at the demo's length (1000-1900 steps).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import yaml

from benchmarks.machine import describe_machine, format_machine

REPO = Path(__file__).parents[1]
# name -> overrides of the base config. EMA: decay 0.993 with a 100-step ramp (LW-DETR / RF-DETR's values for runs of
# a few thousand steps): an average over the last ~140 steps; RT-DETR's 0.9999 / 2000 would still be ramping up at
# step 1000 (decay 0.39 there) and change little
EMA = {"ema_decay": 0.993, "ema_warmup_steps": 100}
# the class terms with the matching cost their papers use: Deformable DETR (focal) class cost 2 and class loss weight
# 2; RT-DETR (varifocal) class cost 2, loss weight 1
FOCAL = {"classification_loss": "focal", "class_cost": 2.0, "class_loss_coefficient": 2.0}
VARIFOCAL = {"classification_loss": "varifocal", "class_cost": 2.0}
# training/configs/demo.yaml's backbone: torchvision's ImageNet MobileNetV2 (`make weights`)
PRETRAINED = {"backbone": "mobilenetv2_100", "backbone_weights": ".weights/mobilenet_v2-b0353104.pth",
              "freeze_batch_norm": True, "freeze_backbone_stem": True, "backbone_learning_rate": 1.0e-4}
DEFORMABLE = {"decoder_type": "deformable", "num_feature_levels": 4, "decoder_n_points": 4, **FOCAL, "num_queries": 30}
VARIANTS = {
    "baseline": {},
    "focal": FOCAL,
    "iou-aware": VARIFOCAL,
    "groups": {"num_query_groups": 13},
    "ema": EMA,
    "all": {**VARIFOCAL, "num_query_groups": 13, **EMA},
    "pretrained": PRETRAINED,
    "pretrained-all": {**PRETRAINED, **VARIFOCAL, "num_query_groups": 13, **EMA},
    # issue 17: training/configs/demo.yaml's changes to demo_detr.yaml (Deformable DETR's decoder, 4 levels)
    "deformable": DEFORMABLE,
    # + query selection (the queries start at the encoder's top proposals), with focal loss (two-stage Deformable
    # DETR) and with varifocal (RT-DETR's IoU-aware query selection)
    "two-stage": {**DEFORMABLE, "two_stage": True},
    "two-stage-iou-aware": {**DEFORMABLE, **VARIFOCAL, "two_stage": True},
    # + contrastive denoising (about 50 noised ground-truth queries a batch at the demo's scale; RT-DETR uses 100
    # with 300 queries)
    "denoising": {**DEFORMABLE, "num_denoising": 50},
    # + RT-DETR's hybrid encoder (cross-scale fusion after AIFI)
    "hybrid": {**DEFORMABLE, "encoder_type": "hybrid"},
    # + Deformable DETR's encoder (deformable attention over every level) instead of AIFI
    "deformable-encoder": {**DEFORMABLE, "encoder_type": "deformable"},
    "two-stage-deformable-encoder": {**DEFORMABLE, "encoder_type": "deformable", "two_stage": True},
    # all of RT-DETR's pieces together
    "rt-detr-like": {**DEFORMABLE, **VARIFOCAL, "encoder_type": "hybrid", "two_stage": True, "num_denoising": 50},
    # + 13 query groups (Group DETR, LW-DETR's count): each group its own reference boxes / query selection heads
    "deformable-groups": {**DEFORMABLE, "num_query_groups": 13},
    "rt-detr-groups": {**DEFORMABLE, **VARIFOCAL, "encoder_type": "hybrid", "two_stage": True, "num_denoising": 50,
                       "num_query_groups": 13},
    # the same with RT-DETR's exact layout (BatchNorm projections before and after the encoder, GELU and the
    # unnormalized sine in AIFI): what transformers' RT-DETRv2 checkpoints load into
    "rt-detr-layout": {**DEFORMABLE, **VARIFOCAL, "encoder_type": "hybrid", "two_stage": True, "num_denoising": 50,
                       "projection_norm": "batch", "decoder_input_proj": True, "encoder_activation_function": "gelu",
                       "position_embedding_type": "sine_absolute"},
}
COLUMNS = ("variant", "AP", "AP50", "AR@100", "steps/s", "wall time")
QUICK_STEPS = 50


def known_fields() -> set[str]:
    """The training script's config keys (ModelArguments, DataArguments, TrainArguments)."""
    from training.arguments import DataArguments, ModelArguments, TrainArguments

    return {f.name for dc in (ModelArguments, DataArguments, TrainArguments) for f in fields(dc)}


def check_variants(names: list[str], variants: dict = VARIANTS) -> None:
    """Every requested variant exists and sets only fields this checkout has: else one error naming each problem."""
    unknown = [name for name in names if name not in variants]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: choose from {', '.join(variants)}.")
    known = known_fields()
    missing = {name: sorted(set(variants[name]) - known) for name in names if set(variants[name]) - known}
    if missing:
        which = "; ".join(f"{name!r} sets {', '.join(keys)}" for name, keys in missing.items())
        runnable = ",".join(name for name in names if name not in missing) or "baseline"
        raise ValueError(f"{which}: not a config field of this checkout's training script (training/arguments.py), "
                         f"so these variants cannot run here. Run the others (--variants {runnable}), or a checkout "
                         "that has the field.")


def variant_config(base: dict, overrides: dict, *, steps: int, output_dir: Path) -> dict:
    """The base config with the variant's overrides and what makes the runs comparable: the same steps, no time
    budget, one evaluation (at the end), no trackers."""
    logging_steps = max(1, min(int(base.get("logging_steps", 10)), steps // 4))   # >= 2 logged steps for steps/s
    return {**base, **overrides, "max_steps": steps, "max_train_minutes": 0, "eval_steps": steps,
            "save_steps": steps, "save_total_limit": 1, "logging_steps": logging_steps,
            "output_dir": str(output_dir), "overwrite_output_dir": True, "resume_from_checkpoint": None,
            "report_to": "none", "push_to_hub": False}


def run_variant(name: str, config: dict, folder: Path) -> float:
    """Trains one variant in its own process (its log in folder/train.log); returns the wall time in seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    started = time.perf_counter()
    with open(folder / "train.log", "w") as log:
        result = subprocess.run([sys.executable, "-m", "training.train", "--config", str(config_file)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        tail = (folder / "train.log").read_text()[-3000:]
        raise RuntimeError(f"variant {name!r} failed (exit code {result.returncode}); its log: {folder / 'train.log'}"
                           f"\n{tail}")
    return wall


def read_row(name: str, run_dir: Path, *, steps: int, wall: float) -> dict:
    """The table's row from the run's metrics.json: the final evaluation, and the training steps' rate."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = next(r for r in metrics["eval_history"] if r["step"] == steps)
    first, last = metrics["train_history"][0], metrics["train_history"][-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    steps_per_s = (last["step"] - first["step"]) / seconds if seconds > 0 else float("nan")
    return {"variant": name, "AP": final["AP"], "AP50": final["AP50"], "AR@100": final["AR100"],
            "steps/s": steps_per_s, "wall time": wall}


def format_table(rows: list[dict]) -> str:
    """A markdown table (it reads as plain text too)."""
    def cell(column, value):
        if column == "variant":
            return value
        if column == "wall time":
            return f"{value / 60:.1f} min" if value >= 60 else f"{value:.0f} s"
        return f"{value:.2f}" if column == "steps/s" else f"{value:.3f}"

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if c == "variant" else "---:" for c in COLUMNS)
             + "|"]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps a variant (default 1000; --quick 50)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--base-config", default=str(REPO / "training" / "configs" / "demo_detr.yaml"))
    parser.add_argument("--output-dir", default="outputs/bench_convergence", help="a folder per variant + the table")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps: checks that everything runs")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else QUICK_STEPS if args.quick else 1000
    if steps < 1:
        parser.error(f"--steps {steps}: give at least 1 optimizer step.")
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    try:
        check_variants(names)
    except ValueError as error:
        parser.error(str(error))
    base = yaml.safe_load(Path(args.base_config).read_text()) or {}
    output = Path(args.output_dir)
    machine = format_machine(describe_machine())
    print(machine, flush=True)
    rows = []
    for name in names:
        config = variant_config(base, VARIANTS[name], steps=steps, output_dir=output / name / "run")
        print(f"== {name}: {steps} steps, overrides {VARIANTS[name] or 'none'}", flush=True)
        wall = run_variant(name, config, output / name)
        rows.append(read_row(name, output / name / "run", steps=steps, wall=wall))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    table = format_table(rows)
    command = shlex.join(["python", "-m", "benchmarks.bench_convergence", *(sys.argv[1:] if argv is None else argv)])
    text = (f"{table}\n\n{steps} optimizer steps per variant, seed {base.get('seed', 42)}, base config "
            f"{args.base_config}; validation split; steps/s are the training steps' rate (noisy on a shared machine)."
            f"\nCommand: `{command}`\n\n```\n{machine}\n```\n")
    (output / "convergence.md").write_text(text)
    (output / "convergence.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{table}\n\nwritten: {output / 'convergence.md'}", flush=True)
    return rows


if __name__ == "__main__":
    main()
