"""Query selection (config.two_stage, query_selection.py): proposals and projected memory equal transformers'
Deformable DETR; the top-k takes the best positions and never padding (RT-DETR's: border positions stay selectable);
what the decoder gets is detached; the encoder loss terms; init; gradients; saving, loading, pipeline and remote code;
the training CLI; and that it learns a fixed batch."""
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import DeformableDetrModel, pipeline

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.class_head import SIGMOID_CLASS_PRIOR
from modeling_detr_custom.loss_detr_custom import DetrCustomLoss
from modeling_detr_custom.query_selection import DetrCustomQuerySelection, encoder_proposals
from modeling_detr_custom.testing_utils import (outputs_with_garbage_in_the_padding, padded_batch,
                                                pipeline_detections_without_the_package, randomize_, tiny_kwargs,
                                                train_on_a_fixed_batch)

ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
SHAPES = [(12, 10), (6, 5), (3, 3), (2, 2)]   # uneven levels, finest first


def _config(**overrides):
    return DetrCustomConfig(**tiny_kwargs(**{**dict(decoder_type="deformable", num_feature_levels=4, two_stage=True,
                                                    classification_loss="focal", id2label=ID2LABEL, **NO_DROPOUT),
                                             **overrides}))


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_(DetrCustomForObjectDetection(_config(**overrides)), seed=seed).eval()


def _memory(seed=0, d_model=32):
    """Two images' flattened memory over SHAPES; image 1 visible on the top-left 3/4 x 4/5 of every level."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for height, width in SHAPES:
        mask = torch.ones(2, height, width, dtype=torch.bool)
        mask[1, max(1, round(height * 0.75)):] = False
        mask[1, :, max(1, round(width * 0.8)):] = False
        masks.append(mask.flatten(1))
    memory_mask = torch.cat(masks, 1)                                  # [2, sequence], True = real
    memory = torch.randn(2, memory_mask.shape[1], d_model, generator=generator)
    return memory, memory_mask


def test_proposals_and_projected_memory_equal_transformers_deformable_detr():
    torch.manual_seed(0)
    selection = DetrCustomQuerySelection(_config())
    for parameter in selection.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    memory, memory_mask = _memory()
    proposals, valid = encoder_proposals(memory_mask, SHAPES)
    theirs = SimpleNamespace(enc_output=selection.enc_output, enc_output_norm=selection.enc_output_norm)
    expected_features, expected_proposals = DeformableDetrModel.gen_encoder_output_proposals(
        theirs, memory, ~memory_mask, SHAPES)                          # their mask: True = padding
    assert torch.equal(torch.isinf(proposals), torch.isinf(expected_proposals))
    assert torch.allclose(proposals[valid], expected_proposals[valid], atol=1e-6)
    features = selection.enc_output_norm(selection.enc_output(memory.masked_fill(~valid[..., None], 0)))
    assert torch.allclose(features, expected_features, atol=1e-6)
    # relative to the visible image: image 1's last visible cell of level 0 is centred near its right / bottom edge
    centres = proposals[..., :2].sigmoid()
    assert not valid[1][~memory_mask[1]].any() and valid[0].sum() > valid[1].sum()
    assert centres[1][valid[1]].max() < 1 - 0.01 and centres[1][valid[1]].max() > 0.9


def test_top_k_takes_the_best_valid_positions_and_detaches_what_the_decoder_gets():
    torch.manual_seed(0)
    selection = DetrCustomQuerySelection(_config(num_queries=8))
    memory, memory_mask = _memory(seed=1)
    memory.requires_grad_(True)
    selected = selection(memory, memory_mask, SHAPES)
    assert selected.content.shape == (2, 8, 32) and selected.reference.shape == selected.pred_boxes.shape == (2, 8, 4)
    assert not selected.content.requires_grad and not selected.reference.requires_grad
    assert selected.logits.requires_grad and selected.pred_boxes.requires_grad
    assert torch.equal(selected.reference, selected.pred_boxes.detach())
    # the scores of every valid position: the selected ones are the 8 best, padding never among them
    proposals, valid = encoder_proposals(memory_mask, SHAPES)
    features = selection.enc_output_norm(selection.enc_output(memory.masked_fill(~valid[..., None], 0)))
    scores = selection.enc_score_head(features).max(-1).values.masked_fill(~valid, float("-inf"))
    best = scores.topk(8, dim=1).values
    assert torch.allclose(selected.logits.max(-1).values, best)
    assert torch.isfinite(selected.pred_boxes).all() and ((selected.pred_boxes > 0) & (selected.pred_boxes < 1)).all()
    with pytest.raises(ValueError, match="images are too small for it"):
        DetrCustomQuerySelection(_config(num_queries=500))(memory, memory_mask, SHAPES)


def test_positions_outside_the_margin_stay_selectable_as_in_rt_detr_padding_never():
    """A level 60 cells wide has border cells whose proposals leave [0.01, 0.99]: their memory is zeroed and their
    box saturates, but they may be selected (RT-DETR's and Deformable DETR's top-k does not exclude them). Padding,
    whose memory is zeroed too and so scores the same, is never selected."""
    torch.manual_seed(0)
    shapes = [(4, 60), (2, 30)]
    selection = DetrCustomQuerySelection(_config(num_queries=12))
    with torch.no_grad():   # zeroed memory scores highest: its LayerNorm output is the direction class 0 reads
        selection.enc_output.bias.normal_()
        direction = selection.enc_output_norm(selection.enc_output.bias)
        selection.enc_score_head.weight.zero_()
        selection.enc_score_head.weight[0] = 10 * direction
    memory_mask = torch.ones(2, 4 * 60 + 2 * 30, dtype=torch.bool)
    memory_mask[1, 180:240] = False                                    # image 1: its last level-0 row is padding
    memory = torch.randn(2, memory_mask.shape[1], 32)
    selected = selection(memory, memory_mask, shapes)
    _, valid = encoder_proposals(memory_mask, shapes)
    outside = memory_mask & ~valid                                     # real positions outside the margin
    assert outside[0].sum() == 8 and outside[1].sum() == 6             # first / last column of each level-0 row
    corner = (selected.reference == 1).all(-1)                         # [batch, queries] the saturated boxes
    assert corner[0].sum() == 8 and corner[1].sum() == 6               # all of them chosen, padding never
    assert torch.isfinite(selected.logits).all()


def test_config_and_a_fresh_model_hold_only_what_two_stage_uses():
    model = DetrCustomForObjectDetection(_config())
    detector = model.model
    assert detector.reference_boxes is None and detector.query_embed is None
    assert not detector.query_selection.enc_bbox_head.layers[-1].weight.any()     # each box starts at its proposal
    prior = -np.log((1 - SIGMOID_CLASS_PRIOR) / SIGMOID_CLASS_PRIOR)
    assert torch.allclose(detector.query_selection.enc_score_head.bias, torch.full((3,), prior, dtype=torch.float32))
    assert DetrCustomForObjectDetection(_config(learn_initial_query=True)).model.query_embed is not None
    with pytest.raises(ValueError, match="two_stage and learn_initial_query need decoder_type='deformable'"):
        DetrCustomConfig(**tiny_kwargs(two_stage=True))
    with pytest.raises(ValueError, match="learn_initial_query=True only means something with two_stage=True"):
        _config(two_stage=False, learn_initial_query=True)


def test_the_selected_proposals_get_the_set_loss_weighted_as_the_decoders():
    model = _model()
    pixel_values, pixel_mask, labels = padded_batch()
    out = model(pixel_values, pixel_mask, labels=labels)
    assert out.logits.shape == (2, 10, 3) and out.pred_boxes.shape == (2, 10, 4)
    assert {"loss_focal_enc", "loss_bbox_enc", "loss_giou_enc", "cardinality_error_enc"} <= set(out.loss_dict)
    weights = model.criterion.weights
    expected = sum(out.loss_dict[f"{term}{suffix}"] * weight for term, weight in weights.items()
                   for suffix in ("", "_0", "_enc"))
    assert torch.allclose(out.loss, expected)
    # the same as the criterion called on the encoder's outputs alone
    detector = model.model(pixel_values, pixel_mask)
    _, alone = DetrCustomLoss(model.config)(detector.enc_logits, detector.enc_pred_boxes, labels)
    assert torch.allclose(alone["loss_giou"], out.loss_dict["loss_giou_enc"])


@pytest.mark.parametrize("learn_initial_query", [False, True])
def test_every_trainable_parameter_gets_a_gradient(learn_initial_query):
    model = _model(freeze_batch_norm=False, freeze_backbone_stem=False, learn_initial_query=learn_initial_query)
    pixel_values, pixel_mask, labels = padded_batch()
    model.train()(pixel_values, pixel_mask, labels=labels).loss.backward()
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0 or not p.grad.isfinite().all())]
    assert not missing


def test_the_padded_memory_is_never_selected_or_read():
    pixel_values, pixel_mask, _ = padded_batch()
    clean, dirty = outputs_with_garbage_in_the_padding(_model(), pixel_values, pixel_mask)
    assert torch.allclose(clean.pred_boxes, dirty.pred_boxes, atol=1e-5)
    assert torch.allclose(clean.logits, dirty.logits, atol=1e-4)


def test_save_load_pipeline_and_remote_code_folder(tmp_path):
    model = _model(seed=2)
    folder = tmp_path / "folder"
    model.save_pretrained(folder)
    DetrCustomImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(folder)
    assert "query_selection.py" in {p.name for p in folder.glob("*.py")}
    loaded = DetrCustomForObjectDetection.from_pretrained(folder).eval()
    assert loaded.config.two_stage and loaded.model.reference_boxes is None
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        expected, found = model(pixel_values, pixel_mask), loaded(pixel_values, pixel_mask)
    assert torch.equal(expected.logits, found.logits) and torch.equal(expected.pred_boxes, found.pred_boxes)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    image.save(folder / "image.png")
    detections = [(d["label"], round(d["score"], 4), d["box"])
                  for d in pipeline("object-detection", model=str(folder))(image, threshold=0.0)]
    assert len(detections) == 30
    assert pipeline_detections_without_the_package(folder, digits=4) == [tuple(d) for d in detections]


def test_it_learns_a_fixed_batch():
    """As test_model_deformable's; the loss (decoder and encoder terms) drops a lot."""
    torch.manual_seed(0)
    losses = train_on_a_fixed_batch(DetrCustomForObjectDetection(_config(num_queries=10)))
    assert losses[-1] < 0.4 * losses[0], losses[::10]


def test_training_script_option_reaches_the_model_and_fine_tuning_keeps_it(tmp_path, data_dir):
    from tiny_run import run, write_config

    run(write_config(tmp_path / "new", data_dir, max_steps=2, eval_steps=2, decoder_type="deformable",
                     num_feature_levels=3, decoder_n_points=2, classification_loss="focal", two_stage=True))
    folder = tmp_path / "new" / "run" / "last"
    assert DetrCustomForObjectDetection.from_pretrained(folder).config.two_stage
    run(write_config(tmp_path / "tuned", data_dir, max_steps=1, eval_steps=1, model_name_or_path=str(folder)))
    tuned = DetrCustomForObjectDetection.from_pretrained(tmp_path / "tuned" / "run" / "last")
    assert tuned.config.two_stage and tuned.model.query_selection is not None


def test_the_convergence_benchmark_has_the_query_selection_variants():
    from benchmarks.bench_convergence import VARIANTS, check_variants

    check_variants(["two-stage", "two-stage-iou-aware"])
    assert VARIANTS["two-stage"]["two_stage"] and VARIANTS["two-stage-iou-aware"]["classification_loss"] == "varifocal"
