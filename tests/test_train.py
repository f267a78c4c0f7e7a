"""The Accelerate training script on the embedded dataset with a tiny model: learning, resume, checkpoints,
several processes, bad input."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from safetensors.torch import load_file

from modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomImageProcessor
from training import train
from training.checkpoints import RunState
from training.data import DetrCollator, get_categories, load_coco
from training.sample_data import write_sample_dataset

TINY_ARGS = dict(
    backbone="resnet18", use_pretrained_backbone=False, freeze_batch_norm=False, freeze_backbone_stem=False,
    d_model=32, encoder_layers=1, decoder_layers=2, num_heads=2, ffn_dim=64, num_queries=10, dropout=0.1,
    train_scales=[64, 80], crop_resize_scales=[64], crop_size=[48, 64], eval_size=64, max_size=128,
    num_workers=0, per_device_train_batch_size=4, per_device_eval_batch_size=8, learning_rate=1e-3,
    backbone_learning_rate=1e-3, lr_scheduler_type="step", lr_drop_epochs=1000, report_to="none",
    logging_steps=1, num_prediction_images=2,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_sample_dataset(root, num_train=16, num_val=8, seed=0)
    return root


def _config(tmp_path, data_dir, **overrides) -> Path:
    values = {**TINY_ARGS, "data_dir": str(data_dir), "output_dir": str(tmp_path / "run"), **overrides}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _run(config, *extra):
    train.main(["--config", str(config), *extra])


def _histories(run: Path) -> tuple[list, list]:
    """metrics.json's train and eval histories, less the wall-clock times."""
    metrics = json.loads((run / "metrics.json").read_text())
    train_history = [{k: v for k, v in record.items() if k != "elapsed_s"} for record in metrics["train_history"]]
    return train_history, metrics["eval_history"]


def _loss_on_training_images(model_or_config, data_dir, processor) -> float:
    dataset = load_coco(data_dir, "train").cast_column("image", datasets.Image(decode=False))
    categories = get_categories(dataset)
    batch = DetrCollator(processor, categories.category_id_to_label)([dataset[i] for i in range(len(dataset))])
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else (
        DetrCustomForObjectDetection(model_or_config))
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(**batch).loss.item()


def test_training_lowers_the_loss_and_writes_a_complete_run(tmp_path, data_dir):
    _run(_config(tmp_path, data_dir, max_steps=24, eval_steps=12, save_total_limit=1))
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert [record["step"] for record in metrics["train_history"]] == list(range(1, 25))
    assert metrics["train_history"][3]["epoch"] == 1.0   # 16 images, 4 a batch: 4 steps an epoch
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "class_error", "lr", "elapsed_s"} <= set(
        metrics["train_history"][0])
    processor = DetrCustomImageProcessor.from_pretrained(run / "last")
    trained = DetrCustomForObjectDetection.from_pretrained(run / "last")
    torch.manual_seed(42)
    initial = _loss_on_training_images(trained.config, data_dir, processor)   # same config, fresh weights
    # deterministic (seeded, CPU): 24 steps measured 17.8 -> 14.3
    assert _loss_on_training_images(trained, data_dir, processor) < 0.9 * initial
    assert [record["step"] for record in metrics["eval_history"]] == [12, 24]
    assert {"AP", "AP50", "AP75", "AR100", "AP_per_class"} <= set(metrics["eval_history"][-1])
    best = max(metrics["eval_history"], key=lambda record: record["AP"])   # the first of equals, like the run
    assert metrics["best"] == best
    assert {k: metrics["run"][k] for k in ("global_steps", "num_train_epochs", "train_images", "val_images",
                                           "total_batch_size", "num_processes")} == {
        "global_steps": 24, "num_train_epochs": 6.0, "train_images": 16, "val_images": 8, "total_batch_size": 4,
        "num_processes": 1}
    for name in ("loss_curve.png", "map_curve.png", "predictions.png"):
        assert (run / name).stat().st_size > 1000
    for folder in ("best", "last"):
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "metrics.json",
                "loss_curve.png", "map_curve.png", "predictions.png"} <= {p.name for p in (run / folder).iterdir()}
    # save_total_limit=1: the newest checkpoint only, complete, at an epoch boundary (24 = 6 epochs of 4 steps)
    assert [p.name for p in run.iterdir() if p.name.startswith((".partial", "checkpoint-"))] == ["checkpoint-24"]
    state = json.loads((run / "checkpoint-24" / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (24, 6, 0)
    assert (state["best_step"], state["best_AP"]) == (best["step"], best["AP"])
    assert state["eval_history"] == metrics["eval_history"]
    # the dataset's classes land in the saved config, in category-id order
    categories = get_categories(load_coco(data_dir, "train"))
    assert trained.config.id2label == dict(enumerate(categories.names)) and trained.config.num_labels == 5


def test_trainer_state_keeps_its_keys(tmp_path):
    """trainer_state.json is the checkpoint format: checkpoints written before RunState existed must resume."""
    old = {"global_step": 30, "epoch": 2, "step_in_epoch": 5, "best_AP": 0.25, "best_step": 30,
           "train_history": [{"loss": 1.5, "step": 30}], "eval_history": [{"step": 30, "AP": 0.25}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(old))
    state = RunState.load(tmp_path)
    assert state.global_step == 30 and state.best_AP == 0.25 and state.train_history == old["train_history"]
    state.save(tmp_path)
    assert (tmp_path / "trainer_state.json").read_text() == json.dumps(old)   # same keys, same order
    assert [f.name for f in dataclasses.fields(RunState)] == list(old)


def test_resume_continues_bit_identically(tmp_path, data_dir):
    common = dict(eval_steps=3, save_steps=3, seed=7)
    _run(_config(tmp_path / "straight", data_dir, max_steps=6, **common))
    _run(_config(tmp_path / "resumed", data_dir, max_steps=3, **common))
    checkpoint = tmp_path / "resumed" / "run" / "checkpoint-3"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (3, 0, 3)   # mid-epoch: 4 steps each
    _run(_config(tmp_path / "resumed", data_dir, max_steps=6, resume_from_checkpoint="latest", **common))
    straight_run, resumed_run = tmp_path / "straight" / "run", tmp_path / "resumed" / "run"
    straight = load_file(straight_run / "last" / "model.safetensors")
    resumed = load_file(resumed_run / "last" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # the whole history, not only the end: every logged loss and learning rate, every evaluation
    assert _histories(straight_run) == _histories(resumed_run)
    assert [r["step"] for r in _histories(resumed_run)[0]] == list(range(1, 7))


def test_interrupted_save_leaves_nothing_resume_trusts(tmp_path, data_dir, monkeypatch):
    def crash_while_saving(self, output_dir=None, **kwargs):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(train.Accelerator, "save_state", crash_while_saving)
    with pytest.raises(KeyboardInterrupt):
        _run(_config(tmp_path, data_dir, max_steps=2, save_steps=1, eval_steps=100))
    run = tmp_path / "run"
    assert not list(run.glob("checkpoint-*"))
    assert [p.name for p in run.glob(".partial-checkpoint-*")] == [".partial-checkpoint-1"]
    assert not (run / ".partial-checkpoint-1" / "trainer_state.json").exists()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="no checkpoint"):
        _run(_config(tmp_path, data_dir, max_steps=2, resume_from_checkpoint="latest"))


def test_resuming_with_other_classes_is_refused(tmp_path, data_dir):
    _run(_config(tmp_path, data_dir, max_steps=1, eval_steps=100))
    other = tmp_path / "other"
    write_sample_dataset(other, num_train=4, num_val=2, seed=0)
    coco = json.loads((other / "annotations" / "instances_train2017.json").read_text())
    coco["categories"].append({"id": 99, "name": "extra"})
    (other / "annotations" / "instances_train2017.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="trained with 5 classes but the dataset has 6"):
        _run(_config(tmp_path, other, max_steps=2, resume_from_checkpoint="latest"))


def test_unknown_config_key(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rat'\]"):
        _run(_config(tmp_path, data_dir, learning_rat=1e-4))


def test_output_dir_holding_a_run_is_refused(tmp_path, data_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run.*--overwrite_output_dir"):
        _run(_config(tmp_path, data_dir, max_steps=1))


def test_non_finite_loss_names_the_step_and_images(tmp_path, data_dir):
    with pytest.raises(FloatingPointError, match=r"at step \d+ \(epoch \d+\), batch image ids \[\d+(, \d+)*\]\. "
                                                 r"Last good checkpoint: none\."):
        _run(_config(tmp_path, data_dir, max_steps=30, eval_steps=100, learning_rate=1e12,
                     backbone_learning_rate=1e12, max_grad_norm=0.0))


def test_two_processes_with_accelerate_launch(tmp_path, data_dir):
    config = _config(tmp_path, data_dir, max_steps=2, eval_steps=2, per_device_train_batch_size=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        # on a machine without CUDA, train.py runs these torchrun processes with gloo on CPU
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train", "--config", str(config)],
        cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["run"]["num_processes"] == 2 and metrics["run"]["total_batch_size"] == 4
    assert [r["step"] for r in metrics["train_history"]] == [1, 2] and metrics["eval_history"][-1]["step"] == 2
