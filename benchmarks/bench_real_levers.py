"""The small-data recipe's levers, one at a time, on the real-data benchmark: which move the held-out AP.

    .venv/bin/python -m benchmarks.bench_real_levers [--preset detr-small] [--levers none,augment,...]
                                                     [--folds right,left] [--seeds 42,43] [--steps 300]
                                                     [--output-dir outputs/bench_real_levers]

Each lever is a set of config overrides (LEVERS, applied last: a lever may also change the sizes or the steps) on
one of bench_real's presets, trained by the training script with bench_real's data, sizes and steps on each fold
(benchmarks.real_data.FOLDS: which region of the image is held out) and seed, and evaluated the same way (held-out
AP at the last step, the training split's AP50 and the gap). One row per lever: the mean over its runs and each
run's held-out AP50 with their spread (standard deviation). One table, written to OUTPUT_DIR/levers.md with the
machine and the command.
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from benchmarks import bench_real
from benchmarks.machine import describe_machine, format_machine

# RT-DETR's augmentation (photometric distortion 0.5, zoom-out 0.5, IoU crop 0.8) with a gentler zoom-out (the objects
# are small), plus the flips and quarter turns that microscopy and overhead images allow
AUGMENT = {"photometric_distort": 0.5, "zoom_out": 0.5, "zoom_out_max": 2.0, "iou_crop": 0.8, "vertical_flip": True,
           "rotate90": True}
EMA = {"ema_decay": 0.99, "ema_warmup_steps": 50}
X2 = {"train_scales": [224, 256, 288], "eval_size": 256, "max_size": 448}   # twice bench_real's sizes
LR_DEMO = {"learning_rate": 5.0e-4, "backbone_learning_rate": 1.0e-4}   # demo.yaml's, half finetune_small.yaml's
LEVERS = {
    "none": {},
    "flips+turns": {"vertical_flip": True, "rotate90": True},
    "augment": AUGMENT,
    "augment+mosaic": {**AUGMENT, "mosaic": 0.5},
    "augment+scale-jitter": {**AUGMENT, "scale_jitter": [0.8, 1.25]},
    "dropout 0.1": {"dropout": 0.1},
    "weight decay 0.05": {"weight_decay": 0.05},
    "ema": EMA,
    "query groups 4": {"num_query_groups": 4},
    "queries 100": {"num_queries": 100},
    "focal": {"classification_loss": "focal"},
    "lr 5e-4": LR_DEMO,
    "lr 2.5e-4": {"learning_rate": 2.5e-4, "backbone_learning_rate": 5.0e-5},
    "augment+ema": {**AUGMENT, **EMA},
    # on top of the flips and quarter turns (finetune_small.yaml's augmentation)
    "turns+wider": {"vertical_flip": True, "rotate90": True, "d_model": 256, "ffn_dim": 1024, "num_heads": 8,
                    "decoder_layers": 3},
    "turns+lr x2": {"vertical_flip": True, "rotate90": True, "learning_rate": 1.0e-3,
                    "backbone_learning_rate": 2.0e-4},
    # on detr-small (finetune_small.yaml): resolution, supervision, regularization, schedule
    "upscale x2": X2,
    "upscale x1.5": {"train_scales": [176, 192, 208], "eval_size": 192, "max_size": 336},
    "groups 3": {"num_query_groups": 3},
    "queries 60": {"num_queries": 60},
    "wd 0.05": {"weight_decay": 0.05},
    "warmup 20": {"warmup_steps": 20},
    "denoising 100": {"num_denoising": 100},
    "600 steps": {"max_steps": 600},
    "stride 4": {"finest_level_stride": 4},
    "stride 4+5 levels": {"finest_level_stride": 4, "num_feature_levels": 5},
    "stride 4+lr 5e-4": {"finest_level_stride": 4, **LR_DEMO},
    "upscale x2+lr 5e-4": {**X2, **LR_DEMO},
    # on twice the input size (finetune_small.yaml's learning rates): loss weights, supervision, schedule, augmentation
    "x2+class weight 1": {**X2, "class_loss_coefficient": 1.0},
    "x2+denoising 100": {**X2, "num_denoising": 100},
    "x2+warmup 20": {**X2, "warmup_steps": 20},
    "x2+backbone lr 4e-4": {**X2, "backbone_learning_rate": 4.0e-4},
    "x2+wd 0.05": {**X2, "weight_decay": 0.05},
    "x2+light augment": {**X2, "photometric_distort": 0.2, "zoom_out": 0.2, "zoom_out_max": 1.5},
    "x2+lr 1.5e-3": {**X2, "learning_rate": 1.5e-3, "backbone_learning_rate": 3.0e-4},
    # one-to-many supervision: H-DETR's hybrid matching on two extra query groups (60 queries, targets repeated 6x;
    # finetune_small.yaml's setting, so on detr-small these add nothing: read them on --preset detr-small-o2o)
    "hybrid": {"num_query_groups": 3, "criterion": "hybrid"},
    "x2+hybrid": {**X2, "num_query_groups": 3, "criterion": "hybrid"},
    "x2+hybrid 2 groups": {**X2, "num_query_groups": 2, "criterion": "hybrid"},
    "x2+hybrid 5 groups": {**X2, "num_query_groups": 5, "criterion": "hybrid"},
    "x2+hybrid repeats 3": {**X2, "num_query_groups": 3, "criterion": "hybrid", "one_to_many_repeats": 3},
    "x2+hybrid+stride 4": {**X2, "num_query_groups": 3, "criterion": "hybrid", "finest_level_stride": 4},
    # RT-DETR's hybrid encoder (AIFI, then a convolutional top-down and bottom-up fusion of the levels, as a CNN
    # detector's FPN / PAN) instead of the attention layers on the coarsest level alone: finetune_small.yaml's, so on
    # detr-small these add nothing; "x2+attention encoder" takes it away (read the others on detr-small-o2o)
    "fusion encoder": {"encoder_type": "hybrid"},
    "attention encoder": {"encoder_type": "detr"},
    "x2+attention encoder": {**X2, "encoder_type": "detr"},
    "x2+fusion width 0.5": {**X2, "hidden_expansion": 0.5},    # RT-DETR-R18's fusion blocks: half the channels
    "x2+fusion encoder": {**X2, "encoder_type": "hybrid"},
    "x2+fusion encoder 3 levels": {**X2, "encoder_type": "hybrid", "num_feature_levels": 3},
    # duplicate removal (finetune_small.yaml's nms_iou_threshold 0.7): off, or at other IoUs
    "x2+no nms": {**X2, "nms_iou_threshold": None},
    "x2+nms 0.5": {**X2, "nms_iou_threshold": 0.5},
}
COLUMNS = ("lever", "AP", "AP50", "AP50 by run", "train AP50", "gap", "s/step")
SETTINGS = {"batch_size": 8, "scales": [112, 128, 144], "eval_size": 128, "max_size": 224}   # bench_real's


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="detr-small", choices=list(bench_real.DETR_PRESETS))
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of {', '.join(LEVERS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--folds", default="right", help="comma-separated, of right, left (benchmarks.real_data: "
                        "which region of the image is held out); several: the table gives their mean")
    parser.add_argument("--seeds", default="42", help="comma-separated; several: the table gives their mean")
    parser.add_argument("--data-dir", default=None, help="a COCO folder instead of the stardist folds")
    parser.add_argument("--output-dir", default="outputs/bench_real_levers")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.levers.split(",") if name.strip()]
    unknown = [name for name in names if name not in LEVERS]
    if unknown:
        parser.error(f"unknown lever(s) {unknown}: choose from {', '.join(LEVERS)}.")
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    output = Path(args.output_dir)
    if args.data_dir is None:
        from benchmarks import real_data

        folds = [fold.strip() for fold in args.folds.split(",") if fold.strip()]
        unknown = [fold for fold in folds if fold not in real_data.FOLDS]
        if unknown:
            parser.error(f"unknown fold(s) {unknown}: choose from {', '.join(real_data.FOLDS)}.")
        data = {fold: real_data.ensure(fold=fold) for fold in folds}
    else:
        data = {"data": Path(args.data_dir)}
    files = {fold: bench_real.subset(data_dir, output / "data" / fold, None, None) for fold, data_dir in data.items()}
    machine = format_machine(describe_machine())
    print(machine, flush=True)
    rows = []
    for name in names:
        print(f"== {name}: {LEVERS[name] or 'no overrides'}", flush=True)
        runs = []
        for fold in files:
            for seed in seeds:
                settings = {**SETTINGS, "steps": args.steps, "seed": seed}
                folder = output / name.replace(" ", "_").replace("/", "div") / f"{fold}_seed{seed}"
                result = bench_real.train_detr(args.preset, files[fold], folder, **settings, extra=LEVERS[name])
                runs.append({**bench_real.row(name, result), "run": f"{fold} {seed}"})
                print(f"  {fold}, seed {seed}: held-out AP50 {runs[-1]['AP50']:.3f}", flush=True)
        rows.append(summarize(name, runs))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        (output / "levers.json").write_text(json.dumps(rows, indent=1))
    table = format_table(rows)
    command = shlex.join(["python", "-m", "benchmarks.bench_real_levers", *(sys.argv[1:] if argv is None else argv)])
    (output / "levers.md").write_text(f"{table}\n\npreset {args.preset}, data {', '.join(map(str, data.values()))}, "
                                      f"seeds {seeds}, {args.steps} steps; held-out split unless named; several "
                                      f"runs: their mean.\nCommand: `{command}`\n\n```\n{machine}\n```\n")
    print(f"\n{table}", flush=True)
    return rows


def summarize(name: str, runs: list[dict]) -> dict:
    """One lever's row: the mean over its runs (folds x seeds), each run's held-out AP50 and their spread."""
    mean = {key: float(np.mean([run[key] for run in runs])) for key in ("AP", "AP50", "train AP50", "gap", "s/step")}
    values = [run["AP50"] for run in runs]
    by_run = " / ".join(f"{value:.3f}" for value in values)
    spread = f" (± {np.std(values):.3f})" if len(values) > 1 else ""
    return {"lever": name, **mean, "AP50 by run": by_run + spread, "runs": runs}


def format_table(rows: list[dict]) -> str:
    return bench_real.format_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
