"""DetrCustomConfig's checks as data: every rule of `RULES` refuses a breaking example with a message that names its
fields and their values; every field of `IGNORED_FIELDS` is refused or warned about once when the chosen variant does
not read it, and is accepted where it does; saved configs load whatever they hold."""
import json
import logging

import pytest

from modeling_detr_custom import DetrCustomConfig
from modeling_detr_custom.configuration_detr_custom import IGNORED_FIELDS, RULES

# rule name -> config values that break that rule first (and only it decides the error)
BREAKING = {
    "encoder_attention_heads_divides_d_model": dict(d_model=30, encoder_attention_heads=4),
    "decoder_attention_heads_divides_d_model": dict(d_model=32, decoder_attention_heads=3),
    "d_model_even": dict(d_model=33, encoder_attention_heads=1, decoder_attention_heads=1),
    "num_queries_positive": dict(num_queries=0),
    "d_model_positive": dict(d_model=0),
    "encoder_layers_positive": dict(encoder_layers=0),
    "decoder_layers_positive": dict(decoder_layers=0),
    "encoder_ffn_dim_positive": dict(encoder_ffn_dim=0),
    "decoder_ffn_dim_positive": dict(decoder_ffn_dim=0),
    "num_channels_positive": dict(num_channels=0),
    "num_query_groups_whole": dict(num_query_groups=0),
    "position_embedding_type_choice": dict(position_embedding_type="rope"),
    "encoder_type_choice": dict(encoder_type="rtdetr"),
    "decoder_type_choice": dict(decoder_type="rtdetr"),
    "activation_function_choice": dict(activation_function="silu"),
    "encoder_activation_function_choice": dict(encoder_activation_function="silu"),
    "sine_absolute_d_model": dict(position_embedding_type="sine_absolute", d_model=34, encoder_attention_heads=2,
                                  decoder_attention_heads=2),
    "projection_norm_choice": dict(projection_norm="layer"),
    "decoder_input_proj_needs_hybrid": dict(decoder_type="deformable", decoder_input_proj=True),
    "classification_loss_choice": dict(classification_loss="bce"),
    "focal_alpha_range": dict(focal_alpha=1.5),
    "varifocal_alpha_range": dict(varifocal_alpha=-0.1),
    "focal_gamma_non_negative": dict(focal_gamma=-1.0),
    "class_loss_coefficient_non_negative": dict(class_loss_coefficient=-2.0),
    "num_feature_levels_positive": dict(num_feature_levels=0),
    "decoder_n_points_positive": dict(decoder_n_points=0),
    "encoder_n_points_positive": dict(encoder_n_points=0),
    "query_selection_needs_deformable": dict(two_stage=True),
    "multiscale_encoder_needs_deformable": dict(encoder_type="hybrid"),
    "hidden_expansion_positive": dict(hidden_expansion=0.0),
    "denoising_ranges": dict(label_noise_ratio=1.5),
    "denoising_needs_deformable_sigmoid": dict(num_denoising=10),
    "learn_initial_query_needs_two_stage": dict(decoder_type="deformable", learn_initial_query=True),
    "finest_level_stride_choice": dict(finest_level_stride=4),
    "levels_need_deformable": dict(num_feature_levels=3),
    "matcher_needs_a_cost": dict(class_cost=0.0, bbox_cost=0.0, giou_cost=0.0),
    "query_source_choice": dict(query_source="anchors"),
    "query_source_matches_two_stage": dict(decoder_type="deformable", query_source="two_stage"),
    "query_source_matches_decoder": dict(query_source="learned_boxes"),
    "criterion_choice": dict(criterion="focal"),
    "one_to_many_repeats_whole": dict(one_to_many_repeats=0),
    "hybrid_needs_query_groups": dict(criterion="hybrid"),
}


def test_every_rule_has_a_breaking_example():
    assert sorted(BREAKING) == sorted(rule.name for rule in RULES)


@pytest.mark.parametrize("rule", RULES, ids=[rule.name for rule in RULES])
def test_each_rule_refuses_its_example_naming_fields_and_values(rule):
    values = BREAKING[rule.name]
    with pytest.raises(ValueError) as error:
        DetrCustomConfig(**values)
    message = str(error.value)
    assert message == rule.error_message({name: values.get(name, getattr(DetrCustomConfig, name))
                                          for name in rule.fields})
    for name in rule.fields:
        assert name in message
    for name, value in values.items():
        if name in rule.fields:
            assert str(value) in message, (name, value)


# field -> (values where the variant ignores it, values where the same setting is read)
IGNORED_EXAMPLES = {
    "hidden_expansion": (dict(hidden_expansion=0.5), dict(preset="rtdetr", hidden_expansion=0.5)),
    "encoder_n_points": (dict(preset="deformable", encoder_n_points=2),
                         dict(preset="deformable", encoder_type="deformable", encoder_n_points=2)),
    "decoder_n_points": (dict(decoder_n_points=2), dict(preset="deformable", decoder_n_points=2)),
    "one_to_many_repeats": (dict(num_query_groups=2, one_to_many_repeats=3),
                            dict(num_query_groups=2, criterion="hybrid", one_to_many_repeats=3)),
    "projection_norm": (dict(projection_norm="batch"), dict(preset="deformable", projection_norm="batch")),
    "batch_independent_inference": (dict(preset="deformable", batch_independent_inference=True),
                                    dict(batch_independent_inference=True)),
    "normalize_decoder_residual": (dict(preset="deformable", normalize_decoder_residual=True),
                                   dict(normalize_decoder_residual=True)),
    "eos_coefficient": (dict(classification_loss="focal", eos_coefficient=0.2), dict(eos_coefficient=0.2)),
    "focal_alpha": (dict(focal_alpha=0.3), dict(classification_loss="focal", focal_alpha=0.3)),
    "focal_gamma": (dict(focal_gamma=1.5), dict(classification_loss="varifocal", focal_gamma=1.5)),
    "varifocal_alpha": (dict(classification_loss="focal", varifocal_alpha=0.6),
                        dict(classification_loss="varifocal", varifocal_alpha=0.6)),
    "label_noise_ratio": (dict(preset="rtdetr", num_denoising=0, label_noise_ratio=0.3),
                          dict(preset="rtdetr", label_noise_ratio=0.3)),
    "box_noise_scale": (dict(preset="rtdetr", num_denoising=0, box_noise_scale=0.4),
                        dict(preset="rtdetr", box_noise_scale=0.4)),
    "backbone_weights_sha256": (dict(backbone_weights_sha256="0" * 64),
                                dict(backbone_weights="weights.pth", backbone_weights_sha256="0" * 64)),
}


def _build(values: dict) -> DetrCustomConfig:
    values = dict(values)
    return DetrCustomConfig.from_preset(values.pop("preset", "detr"), **values)


def test_every_ignored_field_has_examples_and_the_known_ones_are_listed():
    assert sorted(IGNORED_EXAMPLES) == sorted(ignored.field for ignored in IGNORED_FIELDS)
    assert {"normalize_decoder_residual", "eos_coefficient", "hidden_expansion", "encoder_n_points",
            "projection_norm", "batch_independent_inference"} <= set(IGNORED_EXAMPLES)


@pytest.mark.parametrize("ignored", IGNORED_FIELDS, ids=[ignored.field for ignored in IGNORED_FIELDS])
def test_each_ignored_field_is_refused_or_warned_once(ignored, caplog):
    ignoring, reading = IGNORED_EXAMPLES[ignored.field]
    logging.Logger.warning_once.cache_clear()   # transformers' once-only warnings: a fresh start for this test
    value = ignoring[ignored.field]
    if ignored.refuse:
        with pytest.raises(ValueError, match=rf"^{ignored.field}={value!r} has no effect here: .* Drop it"):
            _build(ignoring)
    else:
        with caplog.at_level(logging.WARNING):
            _build(ignoring)
            _build(ignoring)
        warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{ignored.field}=")]
        assert len(warned) == 1 and "has no effect here" in warned[0], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config = _build(reading)
    assert getattr(config, ignored.field) == value
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]


def test_saved_configs_load_whatever_they_hold_and_user_set_options_are_checked(tmp_path, caplog):
    """A saved config with fields its variant ignores loads silently (it holds every field at its value); the same
    fields set by the user on top of it (the training script's options on a checkpoint) are flagged."""
    DetrCustomConfig(backbone="resnet18").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    saved.update(hidden_expansion=3.0, classification_loss="focal", eos_coefficient=0.5)
    path.write_text(json.dumps(saved))
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        config = DetrCustomConfig.from_pretrained(tmp_path)
    assert (config.hidden_expansion, config.eos_coefficient) == (3.0, 0.5)
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]
    config.check_values(user_set={"eos_coefficient"})   # warned, not refused
    with pytest.raises(ValueError, match="hidden_expansion=3.0 has no effect here"):
        config.check_values(user_set={"hidden_expansion"})
    config.num_feature_levels = 2   # an option applied after loading breaks a rule: check_values says so
    with pytest.raises(ValueError, match="num_feature_levels=2 needs decoder_type='deformable'"):
        config.check_values(user_set=())
