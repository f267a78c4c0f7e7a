"""The deformable variant (decoder_type="deformable", model_deformable.py + multiscale.py): presets, init, shapes,
gradients, masks, saving and loading, remote code, pipeline, gradient checkpointing, bf16 autocast, and that it
learns a fixed batch."""
import json

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.attention_deformable import DetrCustomDeformableAttention
from modeling_detr_custom.class_head import SIGMOID_CLASS_PRIOR
from modeling_detr_custom.modeling_detr_custom import DetrCustomModel
from modeling_detr_custom.multiscale import level_masks, valid_ratios
from modeling_detr_custom.testing_utils import (gradients_with_and_without_checkpointing,
                                                outputs_with_garbage_in_the_padding, padded_batch,
                                                pipeline_detections_without_the_package, randomize_, tiny_kwargs,
                                                train_on_a_fixed_batch)

ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def _config(**overrides):
    return DetrCustomConfig(**tiny_kwargs(**{**dict(decoder_type="deformable", num_feature_levels=4,
                                                    classification_loss="focal", id2label=ID2LABEL, **NO_DROPOUT),
                                             **overrides}))


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_(DetrCustomForObjectDetection(_config(**overrides)), seed=seed).eval()


def test_presets_are_config_values_and_detr_is_the_default():
    assert DetrCustomConfig.from_preset("detr").to_dict() == DetrCustomConfig().to_dict()
    config = DetrCustomConfig.from_preset("deformable", num_labels=3, backbone="resnet18")
    assert (config.decoder_type, config.num_feature_levels, config.decoder_n_points, config.num_queries) == (
        "deformable", 4, 4, 300)
    assert (config.classification_loss, config.class_cost, config.class_loss_coefficient) == ("focal", 2.0, 2.0)
    assert config.num_labels == 3 and config.backbone == "resnet18"
    with pytest.raises(ValueError, match="unknown preset 'yolo'; use one of"):
        DetrCustomConfig.from_preset("yolo")
    with pytest.raises(ValueError, match="needs decoder_type='deformable'"):
        DetrCustomConfig(**tiny_kwargs(num_feature_levels=3))
    with pytest.raises(ValueError, match="decoder_n_points must be >= 1"):
        _config(decoder_n_points=0)


def test_the_rt_detr_preset_holds_every_piece_and_they_run_together():
    config = DetrCustomConfig.from_preset("rtdetr", num_labels=3, backbone="resnet18")
    assert (config.decoder_type, config.encoder_type, config.num_feature_levels, config.num_queries) == (
        "deformable", "hybrid", 3, 300)
    assert (config.classification_loss, config.two_stage, config.num_denoising) == ("varifocal", True, 100)
    small = {key: value for key, value in tiny_kwargs().items() if key not in ("num_queries",)}
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(DetrCustomConfig.from_preset("rtdetr", **{**small, **NO_DROPOUT},
                                                                      id2label=ID2LABEL, num_queries=20)).train()
    pixel_values, pixel_mask, labels = padded_batch()
    out = model(pixel_values, pixel_mask, labels=labels)
    assert {"loss_vfl_enc", "loss_vfl_dn_0", "loss_giou_0"} <= set(out.loss_dict) and torch.isfinite(out.loss)
    assert out.logits.shape == (2, 20, 3) and model.model.encoder.fusion is not None


def test_a_fresh_model_keeps_the_deformable_inits_that_the_generic_init_would_wipe():
    model = DetrCustomForObjectDetection(_config())
    reference = DetrCustomDeformableAttention(32, 2, num_levels=4, num_points=4)   # its own reset_parameters
    for layer in model.model.decoder.layers:
        attention = layer.cross_attn
        assert torch.equal(attention.sampling_offsets.bias, reference.sampling_offsets.bias)   # the direction grid
        assert not attention.sampling_offsets.weight.any() and not attention.attention_weights.weight.any()
        assert not attention.attention_weights.bias.any()
    prior = -np.log((1 - SIGMOID_CLASS_PRIOR) / SIGMOID_CLASS_PRIOR)
    for class_head, box_head in zip(model.model.class_embed, model.model.bbox_embed):
        assert torch.allclose(class_head.bias, torch.full((3,), prior, dtype=torch.float32))
        last = box_head.layers[-1]
        assert not last.weight.any() and not last.bias.any()   # layers start at their reference
    boxes = model.model.reference_boxes.sigmoid()
    assert torch.allclose(boxes[:, 2:], torch.tensor(0.1)) and boxes[:, :2].std() > 0.1


def test_forward_shapes_levels_and_masks():
    model = _model()
    pixel_values, pixel_mask, labels = padded_batch()                  # 160 x 128, image 1 padded to 120 x 96
    out = model(pixel_values, pixel_mask, labels=labels, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == (2, 10, 3) and out.pred_boxes.shape == (2, 10, 4)
    assert out.class_activation == "sigmoid" and ((0 <= out.pred_boxes) & (out.pred_boxes <= 1)).all()
    assert len(out.auxiliary_outputs) == 1 and out.auxiliary_outputs[0]["pred_boxes"].shape == (2, 10, 4)
    assert torch.isfinite(out.loss) and {"loss_focal", "loss_bbox", "loss_giou", "loss_focal_0"} <= set(out.loss_dict)
    # strides 8, 16, 32 from the ResNet and one extra stride-2 level
    shapes = [(20, 16), (10, 8), (5, 4), (3, 2)]
    assert out.encoder_last_hidden_state.shape == (2, sum(h * w for h, w in shapes), 32)
    assert out.feature_mask.shape == (2, 5, 4)                          # the encoder's (coarsest backbone) level
    assert len(out.cross_attentions) == 2 and out.cross_attentions[0].shape == (2, 10, 2, 16)
    masks = level_masks(pixel_mask, [torch.zeros(2, 1, h, w) for h, w in shapes])
    ratios = valid_ratios(masks)                                        # [batch, levels, 2] (width, height)
    assert torch.equal(ratios[0], torch.ones(4, 2))
    assert torch.allclose(ratios[1, 0], torch.tensor([96 / 128, 120 / 160]))
    assert masks[0][1].sum() == 15 * 12


def test_every_trainable_parameter_gets_a_gradient():
    model = _model(freeze_batch_norm=False, freeze_backbone_stem=False).train()
    pixel_values, pixel_mask, labels = padded_batch()
    model(pixel_values, pixel_mask, labels=labels).loss.backward()
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0 or not p.grad.isfinite().all())]
    assert not missing


def test_refinement_stops_the_gradient_between_layers():
    model = _model()
    pixel_values, pixel_mask, _ = padded_batch()
    out = model(pixel_values, pixel_mask)
    out.pred_boxes.sum().backward()                                    # the last layer's boxes only
    assert model.model.bbox_embed[1].layers[0].weight.grad.abs().sum() > 0
    # layer 0's box head reaches the last boxes only through the (detached) reference: no gradient
    first = model.model.bbox_embed[0].layers[0].weight.grad
    assert first is None or not first.any()


def test_the_padded_memory_is_never_read():
    """Garbage in every level's padded cells (after the projections) changes nothing: the encoder's key mask and the
    decoder's value mask hold the padding out. (Before that, the backbone's convolutions near the visible border and
    the projections' GroupNorm statistics see the padding, as in Deformable DETR: a padded image's predictions are
    close to, not equal to, its unpadded ones.)"""
    pixel_values, pixel_mask, _ = padded_batch()
    clean, dirty = outputs_with_garbage_in_the_padding(_model(), pixel_values, pixel_mask)
    assert torch.allclose(clean.pred_boxes, dirty.pred_boxes, atol=1e-5)
    assert torch.allclose(clean.logits, dirty.logits, atol=1e-4)


def test_a_loaded_model_keeps_its_stem_frozen(tmp_path):
    DetrCustomForObjectDetection(_config(freeze_backbone_stem=True)).save_pretrained(tmp_path)
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path)
    body = loaded.model.backbone.body
    assert not body.conv1.weight.requires_grad and not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    model = _model(seed=1)
    model.save_pretrained(tmp_path)
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path).eval()
    assert loaded.config.decoder_type == "deformable" and loaded.config.num_feature_levels == 4
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        expected, found = model(pixel_values, pixel_mask), loaded(pixel_values, pixel_mask)
    assert torch.equal(expected.logits, found.logits) and torch.equal(expected.pred_boxes, found.pred_boxes)


def test_a_new_class_head_on_a_loaded_model_starts_at_the_prior_and_the_rest_is_loaded(tmp_path):
    model = _model(seed=1)
    model.save_pretrained(tmp_path)
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    prior = -np.log((1 - SIGMOID_CLASS_PRIOR) / SIGMOID_CLASS_PRIOR)
    for head in loaded.model.class_embed:                              # newly built for 5 classes
        assert head.out_features == 5 and torch.allclose(head.bias, torch.full((5,), prior, dtype=torch.float32))
    for name, tensor in model.state_dict().items():
        if "class_embed" not in name:
            assert torch.equal(tensor, loaded.state_dict()[name]), name


def _save_folder(path):
    model = _model(seed=2)
    model.save_pretrained(path)
    DetrCustomImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(path)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    image.save(path / "image.png")
    return model, image


def _detections(found):
    return [(d["label"], round(d["score"], 4), d["box"]) for d in found]


def test_pipeline_and_remote_code_folder_without_the_package(tmp_path):
    model, image = _save_folder(tmp_path / "folder")
    assert {"model_deformable.py", "multiscale.py", "decoder_deformable.py", "attention_deformable.py"} <= {
        p.name for p in (tmp_path / "folder").glob("*.py")}
    expected = _detections(pipeline("object-detection", model=str(tmp_path / "folder"))(image, threshold=0.0))
    assert len(expected) == 30 and {label for label, _, _ in expected} <= set(ID2LABEL.values())
    found = pipeline_detections_without_the_package(tmp_path / "folder", digits=4)
    assert found == [tuple(d) for d in expected]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    pixel_values, pixel_mask, labels = padded_batch()
    model = _model(seed=3).train()
    (plain_loss, plain), (loss, grads) = gradients_with_and_without_checkpointing(model, pixel_values, pixel_mask,
                                                                                  labels=labels)
    assert model.model.decoder.layers[0].gradient_checkpointing
    assert torch.allclose(plain_loss, loss, atol=1e-6) and plain.keys() == grads.keys()
    assert all(torch.allclose(plain[n], grads[n], atol=1e-5) for n in plain)


@pytest.mark.parametrize("fast_paths", [False, True])
def test_bf16_autocast_runs_and_stays_close(fast_paths):
    model = _model(seed=4)
    if fast_paths:   # the folded backbone, whose maps come out in bf16 (as on images of 2^17 pixels and more)
        model.model.backbone.fast_path_min_pixels = 0
    pixel_values, pixel_mask, labels = padded_batch()
    with torch.no_grad():
        fp32 = model(pixel_values, pixel_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(pixel_values, pixel_mask, labels=labels)
    assert bf16.pred_boxes.dtype == torch.float32 and torch.isfinite(bf16.loss)
    # the random tiny model amplifies bf16's rounding: 0.055 measured with the folded (all-bf16) backbone
    assert (bf16.pred_boxes - fp32.pred_boxes).abs().max() < 0.08


def test_clear_errors_for_what_the_variant_does_not_support():
    with pytest.raises(ValueError, match="use DetrCustomForObjectDetection"):
        DetrCustomModel(_config())
    pixel_values, pixel_mask, _ = padded_batch()
    with pytest.raises(ValueError, match="batch_independent inference is not supported"):
        _model()(pixel_values, pixel_mask, batch_independent=True)
    with pytest.raises(ValueError, match="pixel_mask must be"):
        _model()(pixel_values, pixel_mask[:, :10])


def test_one_level_works_and_tuple_outputs_line_up():
    model = _model(num_feature_levels=1, classification_loss="cross_entropy")
    pixel_values, pixel_mask, labels = padded_batch()
    out = model(pixel_values, pixel_mask, labels=labels)
    assert out.logits.shape == (2, 10, 4) and out.encoder_last_hidden_state.shape == (2, 5 * 4, 32)
    loss, loss_dict, logits, boxes = model(pixel_values, pixel_mask, labels=labels, return_dict=False)[:4]
    assert torch.equal(logits, out.logits) and torch.equal(boxes, out.pred_boxes) and torch.equal(loss, out.loss)


def test_it_learns_a_fixed_batch():
    """One batch of two 64 x 64 images, 50 AdamW steps, the backbone frozen (its cost dominates on CPU): the loss of
    the projections, encoder, queries, refining decoder and sigmoid heads drops a lot."""
    torch.manual_seed(0)
    losses = train_on_a_fixed_batch(DetrCustomForObjectDetection(_config()))
    assert losses[-1] < 0.4 * losses[0], losses[::10]


def test_training_script_trains_the_deformable_variant_and_its_folder_loads(tmp_path, data_dir):
    """--decoder_type / --num_feature_levels / --decoder_n_points reach a new model's config; the saved folder
    loads as the same variant, and fine-tuning it without the options keeps it."""
    from tiny_run import run, write_config

    run(write_config(tmp_path / "new", data_dir, max_steps=2, eval_steps=2, decoder_type="deformable",
                     num_feature_levels=3, decoder_n_points=2, classification_loss="focal"))
    folder = tmp_path / "new" / "run" / "last"
    model = DetrCustomForObjectDetection.from_pretrained(folder)
    assert (model.config.decoder_type, model.config.num_feature_levels, model.config.decoder_n_points) == (
        "deformable", 3, 2)
    assert json.loads((tmp_path / "new" / "run" / "metrics.json").read_text())
    run(write_config(tmp_path / "tuned", data_dir, max_steps=1, eval_steps=1, model_name_or_path=str(folder)))
    tuned = DetrCustomForObjectDetection.from_pretrained(tmp_path / "tuned" / "run" / "last")
    assert tuned.config.decoder_type == "deformable" and tuned.config.classification_loss == "focal"


def test_the_convergence_benchmark_has_the_deformable_variant():
    from benchmarks.bench_convergence import VARIANTS, check_variants

    check_variants(["baseline", "deformable"])
    assert VARIANTS["deformable"]["decoder_type"] == "deformable"
