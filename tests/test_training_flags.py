"""The training script's flags: one per DetrCustomConfig field (generated from the config's source, help from its
docstring), --preset, the shortcuts, every flag with help text in groups by purpose, and --help printed without
importing torch. Given flags that the chosen variant ignores are refused or warned about like the config's own."""
import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_detr_custom import DetrCustomConfig
from training.arguments import CONFIG_FIELDS, PRESETS, ModelArguments, build_parser, parse_args
from training.build import new_model_config

ROOT = Path(__file__).parents[1]
OWN_FIELDS = [f for f in dataclasses.fields(DetrCustomConfig) if f.name in DetrCustomConfig.__annotations__]


def test_every_config_field_has_a_training_flag_read_from_the_config():
    flags = {f.name for f in dataclasses.fields(ModelArguments)}
    assert len(OWN_FIELDS) >= 51 and {f.name for f in OWN_FIELDS} <= flags
    assert {"model_name_or_path", "preset", "num_heads", "ffn_dim"} <= flags
    # the source reader sees the fields, their defaults and the docstring words the imported config has
    read = {f.name: f for f in CONFIG_FIELDS}
    assert list(read) == [f.name for f in OWN_FIELDS]
    for f in OWN_FIELDS:
        assert read[f.name].default == f.default, f.name
        assert read[f.name].help and read[f.name].help.split()[0] in DetrCustomConfig.__doc__, f.name
    assert read["decoder_type"].choices == ("detr", "deformable") and PRESETS == _presets()


def _presets():
    from modeling_detr_custom.configuration_detr_custom import PRESETS as imported

    return imported


def test_every_flag_has_help_text_in_a_group_by_purpose():
    parser = build_parser()
    groups = {group.title: [a for a in group._group_actions if a.help != "==SUPPRESS=="]
              for group in parser._action_groups}
    for title in ("model: where it starts", "model: backbone", "model: transformer", "model: loss and matching",
                  "data: where it comes from", "data: sizes and augmentation", "training: optimizer and schedule",
                  "evaluation and checkpoints", "Hub push"):
        assert groups[title], title
    missing = [a.option_strings for actions in groups.values() for a in actions if not (a.help or "").strip()]
    assert missing == []
    assert [a.dest for a in groups["Hub push"]] == ["push_to_hub", "hub_model_id", "hub_private_repo", "hub_token"]


def test_help_prints_quickly_without_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "training.train", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "model: transformer:" in result.stdout and "--preset" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert not {"torch", "transformers", "accelerate"} & imported


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_flag_builds_the_preset_and_flags_override_it(preset):
    model_args = parse_args(["--data_dir", "d", "--preset", preset, "--num_queries", "12"])[0]
    config, expected = new_model_config(model_args), DetrCustomConfig.from_preset(preset, num_queries=12)
    assert config.to_dict() == {**expected.to_dict(), "use_pretrained_backbone": False}


def test_shortcuts_set_both_parts_unless_a_part_is_given_and_old_spellings_parse():
    model_args, data_args, args = parse_args([
        "--data_dir", "d", "--num_heads", "4", "--decoder_attention_heads", "2", "--ffn_dim", "64", "--dropout", "0.2",
        "--attention_dropout", "0.0", "--no_auxiliary_loss", "--model-name-or-path", "", "--random_crop", "false",
        "--two_stage", "--decoder_type", "deformable", "--train_scales", "64", "80"])
    config = new_model_config(model_args)
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (4, 2)
    assert (config.encoder_ffn_dim, config.decoder_ffn_dim) == (64, 64)
    assert (config.dropout, config.attention_dropout, config.activation_dropout) == (0.2, 0.0, 0.2)
    assert config.auxiliary_loss is False and config.two_stage is True and data_args.random_crop is False
    assert data_args.train_scales == [64, 80] and data_args.crop_size == [384, 600]   # a list default, made later


def test_flags_the_variant_ignores_are_refused_or_warned(caplog):
    with pytest.raises(ValueError, match=r"hidden_expansion=2.0 has no effect here: .*encoder_type='hybrid'"):
        new_model_config(parse_args(["--data_dir", "d", "--hidden_expansion", "2"])[0])
    new_model_config(parse_args(["--data_dir", "d", "--preset", "rtdetr", "--hidden_expansion", "2"])[0])
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        new_model_config(parse_args(["--data_dir", "d", "--preset", "deformable", "--eos_coefficient", "0.3"])[0])
    assert any(r.getMessage().startswith("eos_coefficient=0.3 has no effect here") for r in caplog.records)
