"""training/configs/: every file parses with the training script's arguments, and the COCO config of each preset sets
the preset's model fields."""
from pathlib import Path

import pytest

from modeling_detr_custom import DetrCustomConfig
from training.arguments import parse_args

CONFIGS = sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.yaml"))
# the preset fields that the training script's arguments carry under the same names
PRESET_FIELDS = ("decoder_type", "encoder_type", "num_feature_levels", "decoder_n_points", "num_queries",
                 "encoder_layers", "decoder_layers", "classification_loss", "class_cost", "two_stage", "num_denoising")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(path):
    model_args, data_args, args = parse_args(["--config", str(path)])
    assert args.output_dir and model_args.backbone


@pytest.mark.parametrize("preset, name", [("deformable", "coco_deformable_r50.yaml"),
                                          ("rtdetr", "coco_rtdetr_r50.yaml")])
def test_each_preset_has_a_coco_config_with_its_fields(preset, name):
    model_args, _, _ = parse_args(["--config", str(Path(__file__).parents[1] / "training" / "configs" / name)])
    config, default = DetrCustomConfig.from_preset(preset), DetrCustomConfig()
    for field in PRESET_FIELDS:   # an optional argument left out (None) means the config's default
        given = getattr(model_args, field)
        assert (getattr(default, field) if given is None else given) == getattr(config, field), field
    assert model_args.ffn_dim == config.encoder_ffn_dim == config.decoder_ffn_dim
