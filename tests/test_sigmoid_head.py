"""Sigmoid class heads (classification_loss "focal" / "varifocal"): the head, its init, loading, and the
post-processing that follows it, against transformers' Deformable DETR and RT-DETR implementations."""
import json
import logging
import math

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, DeformableDetrImageProcessor, pipeline

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.class_head import SIGMOID_CLASS_PRIOR
from modeling_detr_custom.testing_utils import (padded_batch, pipeline_detections_without_the_package, randomize_,
                                                tiny_kwargs)

ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}
TERM = {"focal": "focal", "varifocal": "vfl"}   # the class term's logged name: loss_focal / loss_vfl


def _model(seed=0, **overrides):
    config = DetrCustomConfig(**tiny_kwargs(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                            id2label=ID2LABEL, **overrides))
    return randomize_(DetrCustomForObjectDetection(config), seed=seed).eval()


@pytest.mark.parametrize("loss", ["focal", "varifocal"])
def test_sigmoid_head_has_num_labels_outputs_at_the_prior(loss):
    model = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs(classification_loss=loss)))
    assert model.class_embed.out_features == 3                    # no "no object" column
    prior = -math.log((1 - SIGMOID_CLASS_PRIOR) / SIGMOID_CLASS_PRIOR)
    assert torch.allclose(model.class_embed.bias, torch.full((3,), prior))
    assert torch.sigmoid(model.class_embed.bias).sub(0.01).abs().max() < 1e-6
    pixel_values, pixel_mask, labels = padded_batch()
    out = model(pixel_values, pixel_mask, labels=labels)
    assert out.logits.shape == (2, 10, 3) and out.class_activation == "sigmoid"
    assert all(aux["logits"].shape == (2, 10, 3) for aux in out.auxiliary_outputs)
    names = {f"loss_{TERM[loss]}", f"loss_{TERM[loss]}_0", "loss_bbox", "loss_giou"}
    assert torch.isfinite(out.loss) and names <= set(out.loss_dict)
    # the softmax head is today's: num_labels + 1 outputs, zero bias
    softmax = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs()))
    assert softmax.class_embed.out_features == 4 and not softmax.class_embed.bias.any()


@pytest.mark.parametrize("loss", ["focal", "varifocal"])
def test_every_trainable_parameter_gets_a_gradient(loss):
    model = _model(classification_loss=loss).train()
    pixel_values, pixel_mask, labels = padded_batch()
    model(pixel_values, pixel_mask, labels=labels).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [] and model.class_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(classification_loss="bce"), "classification_loss='bce'"),
    (dict(classification_loss="focal", focal_alpha=1.5), "focal_alpha=1.5 must be in"),
    (dict(varifocal_alpha=-0.1), "varifocal_alpha"),
    (dict(focal_gamma=-1.0), "focal_gamma=-1.0 must be >= 0"),
    (dict(class_loss_coefficient=-2), "class_loss_coefficient"),
])
def test_bad_classification_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DetrCustomConfig(**tiny_kwargs(**kwargs))


def test_softmax_checkpoint_fine_tunes_into_a_focal_head(tmp_path, caplog):
    softmax = _model()
    softmax.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        focal = DetrCustomForObjectDetection.from_pretrained(tmp_path, classification_loss="focal")
    assert "has a softmax class head (classification_loss='cross_entropy')" in caplog.text
    assert "newly initialized at the class prior" in caplog.text
    assert focal.config.classification_loss == "focal" and focal.class_embed.out_features == 3
    assert torch.allclose(focal.class_embed.bias, torch.full((3,), -math.log(99.0)))
    loaded, original = focal.state_dict(), softmax.state_dict()
    assert [k for k in original if not torch.equal(original[k], loaded[k])] == [
        "class_embed.weight", "class_embed.bias"]                 # only the class head is new
    # the softmax checkpoint itself still loads unchanged, and a focal folder loads back exactly
    assert torch.equal(DetrCustomForObjectDetection.from_pretrained(tmp_path).class_embed.weight,
                       softmax.class_embed.weight)
    focal.save_pretrained(tmp_path / "focal")
    again = DetrCustomForObjectDetection.from_pretrained(tmp_path / "focal")
    assert again.config.classification_loss == "focal"
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in loaded.items())


def test_transformers_detr_checkpoint_fine_tunes_into_a_varifocal_head_with_new_classes(tmp_path, caplog):
    from transformers import DetrConfig, DetrForObjectDetection

    randomize_(DetrForObjectDetection(DetrConfig(**tiny_kwargs()))).save_pretrained(tmp_path)
    reference = DetrCustomForObjectDetection.from_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = DetrCustomForObjectDetection.from_pretrained(tmp_path, classification_loss="varifocal", num_labels=5)
    assert "has a softmax class head" in caplog.text
    assert model.class_embed.weight.shape == (5, 32)               # 5 classes, no "no object" column
    old, new = reference.state_dict(), model.state_dict()
    assert sorted(k for k in old if old[k].shape != new[k].shape or not torch.equal(old[k], new[k])) == [
        "class_embed.bias", "class_embed.weight"]


def _outputs(batch, queries, classes, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, queries, classes), generator=generator) * 2
    centers = torch.rand((batch, queries, 2), generator=generator) * 0.4 + 0.3
    sizes = torch.rand((batch, queries, 2), generator=generator) * 0.5 + 0.05   # inside the image: no clipping
    return logits, torch.cat([centers, sizes], dim=-1)


@pytest.mark.parametrize("queries, classes, threshold", [(10, 3, 0.0), (50, 5, 0.3), (40, 4, 0.0)])
def test_sigmoid_post_processing_equals_deformable_detr(queries, classes, threshold):
    from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrObjectDetectionOutput

    logits, pred_boxes = _outputs(2, queries, classes, seed=queries)
    sizes = [(480, 640), (300, 200)]
    reference = DeformableDetrImageProcessor().post_process_object_detection(
        DeformableDetrObjectDetectionOutput(logits=logits, pred_boxes=pred_boxes), threshold, sizes)
    ours = DetrCustomImageProcessor().post_process_object_detection(
        {"logits": logits, "pred_boxes": pred_boxes}, threshold, sizes, class_activation="sigmoid")
    for mine, theirs in zip(ours, reference):
        assert len(mine["scores"]) == len(theirs["scores"]) > 0
        if threshold == 0:
            assert len(mine["scores"]) == min(100, queries * classes)
        assert torch.equal(mine["labels"], theirs["labels"])
        torch.testing.assert_close(mine["scores"], theirs["scores"], rtol=0, atol=0)
        torch.testing.assert_close(mine["boxes"], theirs["boxes"], rtol=1e-6, atol=1e-4)


def test_post_processing_follows_the_model_output_and_refuses_a_contradiction():
    processor = DetrCustomImageProcessor()
    pixel_values, pixel_mask, _ = padded_batch()
    sigmoid, softmax = _model(classification_loss="varifocal"), _model()
    with torch.no_grad():
        sigmoid_out, softmax_out = sigmoid(pixel_values, pixel_mask), softmax(pixel_values, pixel_mask)
    found = processor.post_process_object_detection(sigmoid_out, threshold=0.0)
    expected = processor.post_process_object_detection(dict(sigmoid_out), threshold=0.0, class_activation="sigmoid")
    assert len(found[0]["scores"]) == 30                           # 10 queries x 3 classes, best first
    assert all(torch.equal(a[key], b[key]) for a, b in zip(found, expected) for key in a)
    assert (found[0]["scores"].diff() <= 0).all()
    # softmax outputs: today's rule, one detection per query in query order
    plain = processor.post_process_object_detection(softmax_out, threshold=0.0)
    scores, labels = softmax_out.logits.softmax(-1)[..., :-1].max(-1)
    assert torch.equal(plain[0]["scores"], scores[0]) and torch.equal(plain[0]["labels"], labels[0])
    with pytest.raises(ValueError, match="come from a sigmoid class head"):
        processor.post_process_object_detection(sigmoid_out, class_activation="softmax")
    with pytest.raises(ValueError, match="class_activation must be one of"):
        processor.post_process_object_detection(dict(sigmoid_out), class_activation="tanh")


def _save_sigmoid_folder(path):
    model = _model(classification_loss="focal", seed=3)
    model.save_pretrained(path)
    DetrCustomImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(path)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    image.save(path / "image.png")
    return model, image


def _as_pipeline(results, id2label):
    return [(id2label[int(label)], round(float(score), 5),
             box.int().tolist()) for score, label, box in zip(*results.values())]


def test_pipeline_on_a_sigmoid_model_equals_model_plus_post_processing(tmp_path):
    model, image = _save_sigmoid_folder(tmp_path)
    detector = pipeline("object-detection", model=str(tmp_path))
    found = [(d["label"], round(d["score"], 5), [d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")])
             for d in detector(image, threshold=0.0)]
    processor = DetrCustomImageProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    results = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(90, 120)])[0]
    expected = _as_pipeline(results, ID2LABEL)
    assert len(found) == 30 and found == expected                  # every (query, class) pair, best first
    assert len({label for label, _, _ in found}) == 3              # several classes per query: not softmax's argmax


def test_processor_takes_the_activation_from_the_model_folder_and_refuses_a_contradiction(tmp_path):
    _save_sigmoid_folder(tmp_path / "sigmoid")                      # model first, then a processor with None
    assert DetrCustomImageProcessor.from_pretrained(tmp_path / "sigmoid").class_activation == "sigmoid"
    softmax = tmp_path / "softmax"
    _model().save_pretrained(softmax)
    DetrCustomImageProcessor().save_pretrained(softmax)
    assert DetrCustomImageProcessor.from_pretrained(softmax).class_activation == "softmax"
    with pytest.raises(ValueError, match="class_activation='softmax' but the model's config.json has "
                                         "classification_loss='focal'"):
        DetrCustomImageProcessor(class_activation="softmax").save_pretrained(tmp_path / "sigmoid")
    # a folder written by hand (or by an older version) that says the wrong one is refused at loading
    file = tmp_path / "sigmoid" / "preprocessor_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "class_activation": "softmax"}))
    with pytest.raises(ValueError, match="class_activation='softmax' but the model's config.json has "
                                         "classification_loss='focal'"):
        DetrCustomImageProcessor.from_pretrained(tmp_path / "sigmoid")
    with pytest.raises(ValueError, match="class_activation must be one of"):
        DetrCustomImageProcessor(class_activation="tanh")


def test_saved_folder_states_its_activation_for_auto_image_processor(tmp_path):
    """transformers >= 5.25's AutoImageProcessor (and so pipeline(model=folder)) reads preprocessor_config.json
    without our loading hook: the file itself must say sigmoid, and a processor saved without a model beside it keeps
    None."""
    _save_sigmoid_folder(tmp_path / "sigmoid")
    saved = json.loads((tmp_path / "sigmoid" / "preprocessor_config.json").read_text())
    assert saved["class_activation"] == "sigmoid"
    loaded = AutoImageProcessor.from_pretrained(tmp_path / "sigmoid", trust_remote_code=True)
    assert loaded.class_activation == "sigmoid"
    processor = DetrCustomImageProcessor()
    processor.save_pretrained(tmp_path / "alone")
    assert json.loads((tmp_path / "alone" / "preprocessor_config.json").read_text()).get("class_activation") is None
    assert processor.class_activation is None                       # saving does not change the object


def test_sigmoid_remote_code_folder_pipeline_without_the_package(tmp_path):
    model, image = _save_sigmoid_folder(tmp_path / "folder")
    processor = DetrCustomImageProcessor.from_pretrained(tmp_path / "folder")
    expected = pipeline("object-detection", model=model, image_processor=processor)(image, threshold=0.0)
    found = pipeline_detections_without_the_package(tmp_path / "folder", digits=5)
    assert len(found) == 30
    assert found == [(d["label"], round(d["score"], 5), d["box"]) for d in expected]


def test_training_script_trains_a_varifocal_model_and_fine_tuning_keeps_its_head(tmp_path, data_dir):
    """--classification_loss reaches the new model's config; fine-tuning its folder without the option keeps it."""
    from tiny_run import run, write_config

    run(write_config(tmp_path / "new", data_dir, max_steps=2, eval_steps=2, classification_loss="varifocal",
                     class_cost=2.0))
    folder = tmp_path / "new" / "run" / "last"
    model = DetrCustomForObjectDetection.from_pretrained(folder)
    assert model.config.classification_loss == "varifocal" and model.config.class_cost == 2.0
    assert model.class_embed.out_features == model.config.num_labels          # no "no object" column
    run(write_config(tmp_path / "tuned", data_dir, max_steps=1, eval_steps=1, model_name_or_path=str(folder)))
    tuned = DetrCustomForObjectDetection.from_pretrained(tmp_path / "tuned" / "run" / "last")
    assert tuned.config.classification_loss == "varifocal" and tuned.config.class_cost == 2.0
