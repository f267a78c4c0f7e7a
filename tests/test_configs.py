"""training/configs/: every file parses with the training script's arguments, and the COCO config of each preset names
it and builds its model."""
from pathlib import Path

import pytest

from modeling_detr_custom import DetrCustomConfig
from modeling_detr_custom.configuration_detr_custom import PRESETS
from training.arguments import parse_args

CONFIGS = sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(path):
    model_args, data_args, args = parse_args(["--config", str(path)])
    assert args.output_dir and (model_args.backbone or model_args.model_name_or_path)


@pytest.mark.parametrize("preset, name", [("detr", "coco_r50.yaml"), ("deformable", "coco_deformable_r50.yaml"),
                                          ("rtdetr", "coco_rtdetr_r50.yaml")])
def test_each_preset_has_a_coco_config_that_names_it(preset, name):
    """The COCO config names its preset instead of listing the preset's values, and builds the preset's model."""
    import yaml

    from training.build import new_model_config

    path = Path(__file__).parents[1] / "training" / "configs" / name
    assert yaml.safe_load(path.read_text())["preset"] == preset
    assert not set(yaml.safe_load(path.read_text())) & set(PRESETS[preset])   # no preset value re-listed
    model_args, _, _ = parse_args(["--config", str(path)])
    config, expected = new_model_config(model_args), DetrCustomConfig.from_preset(preset)
    for field in (*PRESETS[preset], "d_model", "encoder_attention_heads", "auxiliary_loss"):
        assert getattr(config, field) == getattr(expected, field), field
    assert config.backbone == "resnet50" and config.use_pretrained_backbone


DEMO = Path(__file__).parents[1] / "training" / "configs" / "demo.yaml"
# the demo config itself, small: fewer and smaller images, so that a short run takes seconds
DEMO_SMALL = ["--train_scales", "64", "--eval_size", "64", "--max_size", "96", "--per_device_train_batch_size", "2",
              "--per_device_eval_batch_size", "4", "--max_eval_samples", "4", "--report_to", "none",
              "--num_prediction_images", "1"]


@pytest.mark.parametrize("max_steps", [2, 30, 150])
def test_demo_config_short_runs_finish_with_model_cards(tmp_path, data_dir, max_steps, monkeypatch):
    """A short run of the demo (max_steps below its warm-up and budget timing) trains, saves and writes the cards:
    max_steps is the limit, the time budget neither refuses it nor leaves the card unrenderable."""
    import json

    from training import train

    if not DEMO.exists() or not (Path(__file__).parents[1] / ".weights" / "mobilenet_v2-b0353104.pth").exists():
        pytest.skip("the demo's backbone weights (make weights)")
    monkeypatch.chdir(DEMO.parents[2])   # the config's backbone_weights path is relative to the repository root
    output = tmp_path / "run"
    train.main(["--config", str(DEMO), "--data_dir", str(data_dir), "--write_demo_data", "false",
                "--output_dir", str(output), "--max_steps", str(max_steps), *DEMO_SMALL])
    for folder in ("best", "last"):
        assert "AP" in (output / folder / "README.md").read_text()
    run = json.loads((output / "metrics.json").read_text())["run"]
    assert run["global_steps"] == max_steps
    if max_steps > 10:   # long enough to time: the budget sized the run and max_steps was the limit
        assert run["budget"]["total_steps"] == max_steps and run["budget"]["seconds_per_step"] > 0


@pytest.mark.parametrize("key, value, expected", [
    ("per_device_train_batch_size", -2, "must be > 0"), ("per_device_train_batch_size", 8.5, "a whole number"),
    ("max_steps", 0, r"> 0, or -1"), ("gradient_accumulation_steps", 0, "> 0"),
    ("train_scales", 128, "a list of whole numbers"), ("eval_size", 0, "> 0"),
    ("learning_rate", [1e-4, 1e-5], "must be a number"), ("dropout", 1.5, r"in \[0, 1\)"),
    ("crop_size", [600, 384], "0 < min <= max"), ("random_crop", None, r"a value \(not null\)"),
    ("lr_scheduler_type", "linear", r"one of \['step', 'cosine'\]"), ("num_heads", 3, "divisible by num_heads"),
    ("warmup_steps", -1, ">= 0"), ("max_train_samples", 0, "> 0"),
])
def test_impossible_values_are_refused_naming_the_field(tmp_path, key, value, expected):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"data_dir": "data", key: value}))
    with pytest.raises(ValueError, match=rf"{key}=.*{expected}"):
        parse_args(["--config", str(path)])
