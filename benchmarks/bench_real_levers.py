"""The small-data recipe's levers, one at a time, on the real-data benchmark: which move the held-out AP.

    .venv/bin/python -m benchmarks.bench_real_levers [--preset detr-rtdetr] [--levers none,augment,...]
                                                     [--steps 300] [--output-dir outputs/bench_real_levers]

Each lever is a set of config overrides (LEVERS) on one of bench_real's presets, trained by the training script
with bench_real's data, sizes, steps and seed, and evaluated the same way (held-out AP at the last step, the best
held-out AP50 of the run's evaluations and its step, the training split's AP50 and the gap). One table, written to
OUTPUT_DIR/levers.md with the machine and the command.
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks import bench_real
from benchmarks.machine import describe_machine, format_machine

# RT-DETR's augmentation (photometric distortion 0.5, zoom-out 0.5, IoU crop 0.8) with a gentler zoom-out (the objects
# are small), plus the flips and quarter turns that microscopy and overhead images allow
AUGMENT = {"photometric_distort": 0.5, "zoom_out": 0.5, "zoom_out_max": 2.0, "iou_crop": 0.8, "vertical_flip": True,
           "rotate90": True}
EMA = {"ema_decay": 0.99, "ema_warmup_steps": 50}
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
    "lr x2": {"learning_rate": 1.0e-3, "backbone_learning_rate": 2.0e-4},
    "lr /2": {"learning_rate": 2.5e-4, "backbone_learning_rate": 5.0e-5},
    "augment+ema": {**AUGMENT, **EMA},
    # on top of the flips and quarter turns (finetune_small.yaml's augmentation)
    "turns+wider": {"vertical_flip": True, "rotate90": True, "d_model": 256, "ffn_dim": 1024, "num_heads": 8,
                    "decoder_layers": 3},
    "turns+lr x2": {"vertical_flip": True, "rotate90": True, "learning_rate": 1.0e-3,
                    "backbone_learning_rate": 2.0e-4},
}
COLUMNS = ("lever", "AP", "AP50", "best AP50 (step)", "train AP50", "gap", "s/step")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="detr-rtdetr", choices=list(bench_real.DETR_PRESETS))
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of {', '.join(LEVERS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output-dir", default="outputs/bench_real_levers")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.levers.split(",") if name.strip()]
    unknown = [name for name in names if name not in LEVERS]
    if unknown:
        parser.error(f"unknown lever(s) {unknown}: choose from {', '.join(LEVERS)}.")
    if args.data_dir is None:
        from benchmarks.real_data import ensure

        data_dir = ensure()
    else:
        data_dir = Path(args.data_dir)
    output = Path(args.output_dir)
    files = bench_real.subset(data_dir, output / "data", None, None)
    settings = {"steps": args.steps, "batch_size": 8, "scales": [112, 128, 144], "eval_size": 128, "max_size": 224,
                "seed": 42}
    machine = format_machine(describe_machine())
    print(machine, flush=True)
    rows = []
    for name in names:
        print(f"== {name}: {LEVERS[name] or 'no overrides'}", flush=True)
        folder = output / name.replace(" ", "_").replace("/", "div")
        result = bench_real.train_detr(args.preset, files, folder, **settings, extra=LEVERS[name])
        row = {**bench_real.row(name, result), "lever": name}
        rows.append(row)
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        (output / "levers.json").write_text(json.dumps(rows, indent=1))
    table = format_table(rows)
    command = shlex.join(["python", "-m", "benchmarks.bench_real_levers", *(sys.argv[1:] if argv is None else argv)])
    (output / "levers.md").write_text(f"{table}\n\npreset {args.preset}, data {data_dir}, {args.steps} steps; "
                                      f"held-out split unless named.\nCommand: `{command}`\n\n```\n{machine}\n```\n")
    print(f"\n{table}", flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    return bench_real.format_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
