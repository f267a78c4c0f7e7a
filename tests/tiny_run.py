"""The training tests' tiny run: a tiny model on small images of the embedded dataset (16 train, 8 val images), a
config written as yaml, and `train.main` called in-process. Shared by test_train.py and test_checkpoints.py;
the dataset is conftest.py's `data_dir` fixture."""
import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from training import train

TINY_ARGS = dict(
    backbone="resnet18", use_pretrained_backbone=False, freeze_batch_norm=False, freeze_backbone_stem=False,
    d_model=32, encoder_layers=1, decoder_layers=2, num_heads=2, ffn_dim=64, num_queries=10, dropout=0.1,
    train_scales=[64, 80], crop_resize_scales=[64], crop_size=[48, 64], eval_size=64, max_size=128,
    num_workers=0, per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-3,
    backbone_learning_rate=1e-3, lr_scheduler_type="step", lr_drop_epochs=1000, report_to="none",
    logging_steps=1, num_prediction_images=2,
)


def write_config(tmp_path, data_dir, **overrides) -> Path:
    """A yaml config for the tiny run (output in tmp_path/run); each call writes a new file."""
    tiny = TINY_ARGS
    if overrides.get("model_name_or_path"):   # the checkpoint's architecture and heads, unless the test sets them
        from training.build import APPLIED_TO_CHECKPOINT, FIXED_BY_CHECKPOINT

        tiny = {k: v for k, v in TINY_ARGS.items() if k not in {*APPLIED_TO_CHECKPOINT, *FIXED_BY_CHECKPOINT}}
    values = {**tiny, "data_dir": data_dir and str(data_dir), "output_dir": str(tmp_path / "run"), **overrides}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def run(config, *extra):
    train.main(["--config", str(config), *extra])


def histories(run_dir: Path) -> tuple[list, list]:
    """metrics.json's train and eval histories, less the wall-clock times."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train_history = [{k: v for k, v in record.items() if k != "elapsed_s"} for record in metrics["train_history"]]
    return train_history, metrics["eval_history"]


def last_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "last" / "model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
