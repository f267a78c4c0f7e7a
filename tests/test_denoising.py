"""Denoising training (config.num_denoising, denoising.py): the groups equal transformers' RT-DETR contrastive
denoising groups for the same random draws; nothing leaks into the matching queries; the fixed assignment and the loss
terms; training only; gradients; errors; the training CLI; and that it learns a fixed batch."""
import pytest
import torch
from transformers.models.rt_detr.modeling_rt_detr import get_contrastive_denoising_training_group

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.denoising import denoising_groups, denoising_indices
from modeling_detr_custom.testing_utils import padded_batch, randomize_, tiny_kwargs

ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def _config(**overrides):
    return DetrCustomConfig(**tiny_kwargs(**{**dict(decoder_type="deformable", num_feature_levels=4, num_denoising=12,
                                                    classification_loss="focal", id2label=ID2LABEL, **NO_DROPOUT),
                                             **overrides}))


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_(DetrCustomForObjectDetection(_config(**overrides)), seed=seed)


def _labels():
    boxes = torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.4, 0.2], [0.5, 0.5, 0.9, 0.9]])
    return [{"class_labels": torch.tensor([2, 0, 1]), "boxes": boxes},
            {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.2, 0.8, 0.3, 0.3]])},
            {"class_labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]


@pytest.mark.parametrize("num_denoising, label_noise_ratio, box_noise_scale", [(12, 0.5, 1.0), (100, 0.8, 0.4),
                                                                               (2, 0.0, 1.0)])
def test_groups_equal_transformers_rt_detr_for_the_same_draws(num_denoising, label_noise_ratio, box_noise_scale):
    torch.manual_seed(0)
    embed = torch.nn.Embedding(4, 8, padding_idx=3)
    labels = _labels()
    torch.manual_seed(1)
    theirs_class, theirs_box_unact, theirs_mask, meta = get_contrastive_denoising_training_group(
        labels, 3, 10, embed, num_denoising, label_noise_ratio, box_noise_scale)
    torch.manual_seed(1)
    ours = denoising_groups(labels, embed, 3, 10, num_denoising, label_noise_ratio, box_noise_scale)
    assert ours.num_groups == meta["dn_num_group"] == max(1, num_denoising // 3)
    assert torch.equal(ours.content, theirs_class)                   # the same flipped labels' embeddings
    assert torch.allclose(ours.reference, theirs_box_unact.sigmoid(), atol=1e-6)
    assert torch.equal(ours.attn_mask, theirs_mask == 0)             # theirs: 0 = attend, -inf = blocked
    assert [i.tolist() for i in ours.positive_index] == [i.tolist() for i in meta["dn_positive_idx"]]
    assert [ours.num_queries, 10] == meta["dn_num_split"]


def test_positives_are_near_their_target_and_negatives_further():
    torch.manual_seed(0)
    labels = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    groups = denoising_groups(labels, torch.nn.Embedding(4, 8, padding_idx=3), 3, 10, 200, 0.0, 1.0)
    assert groups.num_groups == 200 and groups.num_queries == 400
    corners = torch.cat([groups.reference[0, :, :2] - groups.reference[0, :, 2:] / 2,
                         groups.reference[0, :, :2] + groups.reference[0, :, 2:] / 2], -1)     # [400, 4] xyxy
    moved = (corners - torch.tensor([0.4, 0.4, 0.6, 0.6])).abs().max(-1).values / 0.1            # in half sizes
    positive, negative = moved[0::2], moved[1::2]                    # one target: positive, negative, ...
    assert positive.max() < 1 and negative.min() >= 1 and negative.max() < 2
    indices = denoising_indices(groups, labels)
    assert indices[0][0].tolist() == list(range(0, 400, 2)) and indices[0][1].tolist() == [0] * 200


def test_nothing_leaks_into_the_matching_queries():
    """With denoising, the matching queries' outputs are those of the same model without it (train mode, dropout 0),
    whatever the noise: the mask keeps every denoising query out of their self-attention."""
    model = _model().train()
    pixel_values, pixel_mask, labels = padded_batch()
    with torch.no_grad():
        plain = model.model(pixel_values, pixel_mask)                 # no labels: no denoising
        for seed in (1, 2):
            torch.manual_seed(seed)
            noised = model.model(pixel_values, pixel_mask, labels=labels)
            assert noised.denoising is not None and noised.denoising["logits"].shape[2] > 0
            assert torch.allclose(noised.logits, plain.logits, atol=1e-5)
            assert torch.allclose(noised.pred_boxes, plain.pred_boxes, atol=1e-6)


def test_loss_terms_training_only_and_weights():
    model = _model().train()
    pixel_values, pixel_mask, labels = padded_batch()
    out = model(pixel_values, pixel_mask, labels=labels)
    assert {"loss_focal_dn_0", "loss_bbox_dn_1", "loss_giou_dn_1"} <= set(out.loss_dict)
    assert out.logits.shape == (2, 10, 3) and out.pred_boxes.shape == (2, 10, 4)
    weights = model.criterion.weights
    expected = sum(out.loss_dict[f"{term}{suffix}"] * weight for term, weight in weights.items()
                   for suffix in ("", "_0", "_dn_0", "_dn_1"))
    assert torch.allclose(out.loss, expected)
    model.eval()
    with torch.no_grad():
        evaluated = model(pixel_values, pixel_mask, labels=labels)
    assert not any("_dn_" in name for name in evaluated.loss_dict)   # eval mode: no denoising, even with labels
    assert model.model(pixel_values, pixel_mask).denoising is None


def test_every_trainable_parameter_gets_a_gradient_with_query_selection_too():
    model = _model(freeze_batch_norm=False, freeze_backbone_stem=False, two_stage=True).train()
    pixel_values, pixel_mask, labels = padded_batch()
    model(pixel_values, pixel_mask, labels=labels).loss.backward()
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0 or not p.grad.isfinite().all())]
    assert not missing
    assert model.model.denoising_class_embed.weight.grad[3].abs().sum() == 0   # the padding row learns nothing
    fresh = DetrCustomForObjectDetection(_config()).model.denoising_class_embed
    assert not fresh.weight[3].any() and fresh.weight[:3].std() > 0.5       # and starts at zero


def test_a_batch_without_targets_and_clear_errors():
    model = _model().train()
    pixel_values, pixel_mask, _ = padded_batch()
    empty = [{"class_labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    out = model(pixel_values, pixel_mask, labels=empty)
    assert torch.isfinite(out.loss) and not any("_dn_" in name for name in out.loss_dict)
    with pytest.raises(ValueError, match="num_denoising=12 needs decoder_type='deformable' and a sigmoid"):
        _config(classification_loss="cross_entropy")
    with pytest.raises(ValueError, match="num_denoising=12 needs decoder_type='deformable'"):
        DetrCustomConfig(**tiny_kwargs(num_denoising=12, classification_loss="focal"))
    with pytest.raises(ValueError, match="label_noise_ratio in \\[0, 1\\]"):
        _config(label_noise_ratio=1.5)


def test_it_learns_a_fixed_batch():
    """As test_model_deformable's, 50 steps; the training loss has fresh noise every step, so the figure is the
    matching queries' loss (eval mode: no denoising), which drops as much as without denoising."""
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(_config()).train()
    model.model.backbone.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    pixel_values, pixel_mask, labels = padded_batch(height=64, width=64)

    def matching_loss():
        with torch.no_grad():
            return model.eval()(pixel_values, pixel_mask, labels=labels).loss.item()

    before = matching_loss()
    for _ in range(50):
        loss = model.train()(pixel_values, pixel_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
    assert matching_loss() < 0.4 * before


def test_training_script_option_reaches_the_model(tmp_path, data_dir):
    from tiny_run import run, write_config

    run(write_config(tmp_path / "new", data_dir, max_steps=2, eval_steps=2, decoder_type="deformable",
                     num_feature_levels=3, decoder_n_points=2, classification_loss="focal", num_denoising=20,
                     two_stage=True))
    model = DetrCustomForObjectDetection.from_pretrained(tmp_path / "new" / "run" / "last")
    assert model.config.num_denoising == 20 and model.model.denoising_class_embed is not None


def test_resume_is_bit_identical_with_every_rt_detr_option(tmp_path, data_dir):
    """The denoising noise is drawn from torch's generator, which the checkpoint restores: a run resumed at step 2
    ends with the straight run's weights and logs, with query selection, the hybrid encoder and denoising on."""
    from tiny_run import histories, last_weights, run, write_config

    options = dict(decoder_type="deformable", encoder_type="hybrid", num_feature_levels=3, decoder_n_points=2,
                   classification_loss="varifocal", two_stage=True, num_denoising=20, eval_steps=2, save_steps=2,
                   seed=3)
    run(write_config(tmp_path / "straight", data_dir, max_steps=4, **options))
    run(write_config(tmp_path / "resumed", data_dir, max_steps=2, **options))
    run(write_config(tmp_path / "resumed", data_dir, max_steps=4, resume_from_checkpoint="latest", **options))
    straight, resumed = last_weights(tmp_path / "straight" / "run"), last_weights(tmp_path / "resumed" / "run")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert histories(tmp_path / "straight" / "run") == histories(tmp_path / "resumed" / "run")
    config = DetrCustomForObjectDetection.from_pretrained(tmp_path / "resumed" / "run" / "last").config
    assert (config.num_denoising, config.two_stage, config.encoder_type) == (20, True, "hybrid")
