"""transformers' RT-DETRv2 checkpoints load through our `from_pretrained` with its outputs
(checkpoint_conversion_rt_detr.py): random-weight `RTDetrV2ForObjectDetection` models with its own ResNet-vd, saved by
transformers, loaded by ours; every decoder layer's logits and boxes, the pipeline's detections; the RT-DETR layout's
pieces on their own (the absolute sine, the first-block shortcut, the BatchNorm projections); clear errors for what
does not convert."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor, RTDetrResNetConfig,
                          RTDetrV2Config, RTDetrV2ForObjectDetection, pipeline)
from transformers.models.rt_detr_v2.modeling_rt_detr_v2 import build_2d_sinusoidal_position_embedding

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.checkpoint_conversion_rt_detr import convert_rt_detr_config
from modeling_detr_custom.position_encoding import DetrCustomAbsoluteSinePositionEmbedding
from modeling_detr_custom.testing_utils import padded_batch, randomize_, tiny_kwargs, train_on_a_fixed_batch

# RTDetrResNetConfig of the released R18vd / R50vd checkpoints (PekingU/rtdetr_v2_r18vd, _r50vd)
RESNET_VD = {
    "basic": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
    "bottleneck": dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048]),
}


def _rt_detr_v2(layer_type: str = "basic", seed: int = 0, **overrides) -> RTDetrV2ForObjectDetection:
    """A small RTDetrV2ForObjectDetection (its ResNet-vd at full width, a 64-wide transformer) with random weights and
    BatchNorm statistics, so that every tensor matters."""
    torch.manual_seed(seed)
    backbone = RTDetrResNetConfig(out_indices=[2, 3, 4], embedding_size=64, **RESNET_VD[layer_type])
    fields = dict(backbone_config=backbone, encoder_in_channels=backbone.hidden_sizes[1:], d_model=64,
                  encoder_hidden_dim=64, decoder_in_channels=[64, 64, 64], num_queries=12, decoder_layers=3,
                  num_labels=3, hidden_expansion=0.5, encoder_ffn_dim=128, decoder_ffn_dim=128, num_denoising=0,
                  encoder_attention_heads=4, decoder_attention_heads=4)
    model = randomize_(RTDetrV2ForObjectDetection(RTDetrV2Config(**{**fields, **overrides})).eval(), seed)
    for layer in model.model.decoder.layers:     # a buffer derived from the config (1 / points), not a weight
        layer.encoder_attn.n_points_scale.fill_(1 / model.config.decoder_n_points)
    return model


def _every_layer(logits, boxes, auxiliary_outputs):
    """Ours as [layers, batch, queries, ...], like their intermediate_* moved to the front."""
    return (torch.stack([a["logits"] for a in auxiliary_outputs] + [logits]),
            torch.stack([a["pred_boxes"] for a in auxiliary_outputs] + [boxes]))


@pytest.mark.parametrize("layer_type, overrides", [
    ("basic", {}),
    # (learn_initial_query=True cannot be compared: transformers 5.25's RT-DETRv2 calls `.tile` on the Embedding)
    ("basic", dict(hidden_expansion=1.0, decoder_n_points=2, encoder_layers=2)),
    ("basic", dict(num_denoising=20, num_queries=30)),          # trained with denoising; inference runs none
    ("bottleneck", {}),
])
def test_outputs_equal_transformers_rt_detr_v2(tmp_path, layer_type, overrides):
    theirs = _rt_detr_v2(layer_type, **overrides)
    theirs.save_pretrained(tmp_path)
    ours = DetrCustomForObjectDetection.from_pretrained(tmp_path).eval()
    assert ours.config.backbone == {"basic": "resnet18d", "bottleneck": "resnet50d"}[layer_type]
    pixel_values = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(pixel_values=pixel_values)
        got = ours(pixel_values=pixel_values)
    logits, boxes = _every_layer(got.logits, got.pred_boxes, got.auxiliary_outputs)
    torch.testing.assert_close(logits, expected.intermediate_logits.transpose(0, 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, expected.intermediate_reference_points.transpose(0, 1), atol=1e-4, rtol=0)
    # not vacuous: queries and images differ
    assert got.pred_boxes.std(1).min() > 1e-3 and (got.logits[0] - got.logits[1]).abs().max() > 1e-2


def test_rt_detr_v1_checkpoints_load_with_equal_outputs(tmp_path):
    """RT-DETR (v1, `RTDetrForObjectDetection`, e.g. PekingU/rtdetr_r50vd): the same modules; its attention is v2's
    with offset scale 0.5 and bilinear sampling, so the same conversion applies."""
    torch.manual_seed(0)
    backbone = RTDetrResNetConfig(out_indices=[2, 3, 4], embedding_size=64, **RESNET_VD["basic"])
    config = RTDetrConfig(backbone_config=backbone, encoder_in_channels=[128, 256, 512], d_model=64,
                          encoder_hidden_dim=64, decoder_in_channels=[64, 64, 64], num_queries=12, decoder_layers=3,
                          num_labels=3, hidden_expansion=0.5, encoder_ffn_dim=128, decoder_ffn_dim=128,
                          num_denoising=0, encoder_attention_heads=4, decoder_attention_heads=4)
    theirs = randomize_(RTDetrForObjectDetection(config).eval())
    theirs.save_pretrained(tmp_path)
    ours = DetrCustomForObjectDetection.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = theirs(pixel_values=pixel_values), ours(pixel_values=pixel_values)
    logits, boxes = _every_layer(got.logits, got.pred_boxes, got.auxiliary_outputs)
    torch.testing.assert_close(logits, expected.intermediate_logits.transpose(0, 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes, expected.intermediate_reference_points.transpose(0, 1), atol=1e-4, rtol=0)
    assert got.pred_boxes.std(1).min() > 1e-3


def test_pipeline_detections_equal_transformers(tmp_path):
    theirs = _rt_detr_v2()
    theirs.save_pretrained(tmp_path)
    RTDetrImageProcessor(size={"height": 160, "width": 160}).save_pretrained(tmp_path)
    ours = DetrCustomForObjectDetection.from_pretrained(tmp_path).eval()
    processor = DetrCustomImageProcessor.from_pretrained(tmp_path)   # reads their preprocessor_config.json
    assert (processor.size, processor.do_normalize, processor.class_activation) == (
        {"height": 160, "width": 160}, False, "sigmoid")
    image = Image.fromarray((np.random.RandomState(0).rand(120, 150, 3) * 255).astype("uint8"))
    expected = pipeline("object-detection", model=theirs, image_processor=RTDetrImageProcessor.from_pretrained(
        tmp_path))(image, threshold=0.0)
    got = pipeline("object-detection", model=ours, image_processor=processor)(image, threshold=0.0)
    # RT-DETR's post-processing keeps the num_queries best (query, class) pairs, ours the best 100 (Deformable
    # DETR's top_k): the same ranking, ours longer
    assert len(expected) == 12 and len(got) == 36
    for mine, reference in zip(got, expected):
        # ours clips boxes to the image (150 x 120), RT-DETR's does not
        limits = {"xmin": 150, "xmax": 150, "ymin": 120, "ymax": 120}
        clipped = {key: min(max(value, 0), limits[key]) for key, value in reference["box"].items()}
        assert mine["label"] == reference["label"] and mine["box"] == clipped
        assert mine["score"] == pytest.approx(reference["score"], abs=1e-5)


def test_converted_model_saves_reloads_and_fine_tunes_on_new_classes(tmp_path):
    _rt_detr_v2(num_denoising=20, num_queries=30).save_pretrained(tmp_path / "theirs")
    converted = DetrCustomForObjectDetection.from_pretrained(tmp_path / "theirs").eval()
    converted.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "detr_custom"
    reloaded = DetrCustomForObjectDetection.from_pretrained(tmp_path / "ours").eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, converted(pixel_values).logits, atol=0, rtol=0)
    # new classes: the class heads (per layer, query selection, denoising labels) are new, the rest is kept
    tuned = DetrCustomForObjectDetection.from_pretrained(tmp_path / "theirs", num_labels=5,
                                                         ignore_mismatched_sizes=True)
    assert tuned.model.class_embed[0].out_features == tuned.model.query_selection.enc_score_head.out_features == 5
    torch.testing.assert_close(tuned.model.decoder.layers[0].linear1.weight,
                               converted.model.decoder.layers[0].linear1.weight)
    tuned.model.backbone.requires_grad_(False)
    losses = train_on_a_fixed_batch(tuned, steps=8, lr=1e-3)
    pixel_values, pixel_mask, labels = padded_batch(height=64, width=64)
    assert "loss_vfl_dn_0" in tuned(pixel_values, pixel_mask, labels=labels).loss_dict   # denoising trains too
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("change, named", [
    (dict(decoder_method="discrete"), "decoder_method"),
    (dict(num_feature_levels=4), "num_feature_levels"),
    (dict(encode_proj_layers=[1]), "encode_proj_layers"),
    (dict(encoder_hidden_dim=128), "encoder_hidden_dim"),
    (dict(normalize_before=True), "normalize_before"),
    (dict(backbone_config={"model_type": "rt_detr_resnet", "layer_type": "basic", "depths": [1, 1, 1, 1]}),
     "depths"),
    (dict(backbone_config={"model_type": "timm_backbone", "backbone": "resnet18"}), "rt_detr_resnet"),
])
def test_what_does_not_convert_is_a_clear_error(tmp_path, change, named):
    backbone = RTDetrResNetConfig(out_indices=[2, 3, 4], **RESNET_VD["basic"])
    config = {**RTDetrV2Config(backbone_config=backbone, encoder_in_channels=[128, 256, 512]).to_dict(), **change}
    with pytest.raises(ValueError, match=named):
        convert_rt_detr_config(config)
    # and through from_pretrained, before any weight is read
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"unread": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=named):
        DetrCustomForObjectDetection.from_pretrained(tmp_path)


def test_absolute_sine_equals_rt_detr_and_ignores_padding():
    embedding = DetrCustomAbsoluteSinePositionEmbedding(64)
    mask = torch.ones(2, 5, 7, dtype=torch.bool)
    expected = build_2d_sinusoidal_position_embedding(5, 7, embed_dim=64, temperature=10000)
    torch.testing.assert_close(embedding(mask, has_padding=False)[0], expected, atol=1e-6, rtol=0)
    mask[1, 3:] = False      # padding changes DETR's normalized sine of the real cells, not this one
    torch.testing.assert_close(embedding(mask)[1], expected, atol=1e-6, rtol=0)


def test_first_block_shortcut_is_resnet_vd_and_folds():
    config = DetrCustomConfig(**tiny_kwargs(backbone="resnet18d", backbone_first_block_shortcut=True))
    model = randomize_(DetrCustomForObjectDetection(config)).eval()
    shortcut = model.model.backbone.body.layer1[0].downsample
    assert shortcut is not None and shortcut[1].kernel_size == (1, 1)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(pixel_values).logits
        model.model.backbone.fast_path_min_pixels = 0        # the folded BatchNorm path, shortcut included
        folded = model(pixel_values).logits
    torch.testing.assert_close(folded, plain, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="basic blocks"):
        DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs(backbone="resnet50d",
                                                                    backbone_first_block_shortcut=True)))


def test_rt_detr_layout_options_are_checked_and_train():
    with pytest.raises(ValueError, match="encoder_type='hybrid'"):
        DetrCustomConfig(decoder_type="deformable", num_feature_levels=3, decoder_input_proj=True)
    with pytest.raises(ValueError, match="projection_norm"):
        DetrCustomConfig(decoder_type="deformable", num_feature_levels=3, projection_norm="layer")
    with pytest.raises(ValueError, match="encoder_activation_function"):
        DetrCustomConfig(encoder_activation_function="silu")
    with pytest.raises(ValueError, match="divisible by 4"):
        DetrCustomConfig(d_model=250, encoder_attention_heads=2, decoder_attention_heads=2,
                         position_embedding_type="sine_absolute")
    config = DetrCustomConfig(**tiny_kwargs(
        decoder_type="deformable", encoder_type="hybrid", num_feature_levels=3, classification_loss="varifocal",
        two_stage=True, num_denoising=10, projection_norm="batch", decoder_input_proj=True,
        encoder_activation_function="gelu", position_embedding_type="sine_absolute"))
    model = DetrCustomForObjectDetection(config)
    assert isinstance(model.model.input_proj.levels[0][1], torch.nn.BatchNorm2d)
    assert model.model.input_proj.levels[0][0].bias is None
    assert len(model.model.decoder_input_proj) == 3
    losses = train_on_a_fixed_batch(model, steps=50)
    assert min(losses[-5:]) < 0.65 * losses[0]    # 0.55x measured (denoising terms included)


def test_training_script_options_reach_the_model_and_fine_tuning_keeps_them(tmp_path, data_dir):
    from tiny_run import run, write_config

    layout = dict(decoder_type="deformable", encoder_type="hybrid", num_feature_levels=3, decoder_n_points=2,
                  classification_loss="varifocal", two_stage=True, projection_norm="batch", decoder_input_proj=True,
                  encoder_activation_function="gelu", position_embedding_type="sine_absolute", backbone="resnet18d",
                  backbone_first_block_shortcut=True)
    run(write_config(tmp_path / "new", data_dir, max_steps=2, eval_steps=2, **layout))
    folder = tmp_path / "new" / "run" / "last"
    config = DetrCustomForObjectDetection.from_pretrained(folder).config
    assert {key: getattr(config, key) for key in layout} == layout
    run(write_config(tmp_path / "tuned", data_dir, max_steps=1, eval_steps=1, model_name_or_path=str(folder)))
    tuned = DetrCustomForObjectDetection.from_pretrained(tmp_path / "tuned" / "run" / "last")
    assert tuned.config.decoder_input_proj and tuned.model.backbone.body.layer1[0].downsample is not None


def test_fine_tuning_an_rt_detr_checkpoint_keeps_its_pixel_scaling(tmp_path, data_dir):
    """RT-DETR checkpoints were trained on [0, 1] pixels without ImageNet normalization: the training script reads the
    checkpoint's preprocessor_config.json for the scaling (sizes stay the run's), and the saved folder keeps it."""
    from tiny_run import run, write_config

    from training.build import checkpoint_pixel_scaling

    theirs = tmp_path / "theirs"
    _rt_detr_v2().save_pretrained(theirs)
    RTDetrImageProcessor().save_pretrained(theirs)
    assert checkpoint_pixel_scaling(str(theirs))["do_normalize"] is False
    assert checkpoint_pixel_scaling(None) == {}
    run(write_config(tmp_path / "tuned", data_dir, max_steps=1, eval_steps=1, model_name_or_path=str(theirs)))
    saved = DetrCustomImageProcessor.from_pretrained(tmp_path / "tuned" / "run" / "last")
    assert saved.do_normalize is False and saved.size == {"shortest_edge": 64, "longest_edge": 128}
    tuned = DetrCustomForObjectDetection.from_pretrained(tmp_path / "tuned" / "run" / "last")
    assert tuned.config.num_labels == 5 and tuned.config.decoder_input_proj
