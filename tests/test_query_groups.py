"""Query groups (Group DETR, `config.num_query_groups`): the mask keeps groups apart, eval runs one group, the loss
is the mean of the groups' 1-group losses, checkpoints with other group counts load; parity with transformers'
LW-DETR (attention of its group-DETR decoder, box-loss normalization of its criterion)."""
import re

import pytest
import torch
from transformers import LwDetrConfig
from transformers.loss.loss_lw_detr import LwDetrHungarianMatcher, LwDetrImageLoss
from transformers.models.lw_detr.modeling_lw_detr import LwDetrAttention

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.attention_mha import DetrCustomAttention
from modeling_detr_custom.loss_detr_custom import DetrCustomLoss
from modeling_detr_custom.query_groups import GROUP_INIT_NOISE, group_attention_mask, with_denoising_mask
from modeling_detr_custom.testing_utils import (gradients_with_and_without_checkpointing, padded_batch, randomize_,
                                                remote_code_files, tiny_kwargs)

NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
QUERIES = tiny_kwargs()["num_queries"]


def _model(num_groups, seed=0, **overrides):
    config = DetrCustomConfig(**tiny_kwargs(num_query_groups=num_groups, **NO_DROPOUT, **overrides))
    return randomize_(DetrCustomForObjectDetection(config), seed=seed)


def _pair(num_groups, **overrides):
    """A K-group model and a 1-group model with the same weights (the first group's queries)."""
    grouped = _model(num_groups, **overrides)
    single = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs(**NO_DROPOUT, **overrides)))
    missing, unexpected = single.load_state_dict(grouped.state_dict(), strict=False)
    assert missing == [] and set(unexpected) == {f"model.extra_query_embeds.{i}.weight"
                                                 for i in range(num_groups - 1)}
    return grouped, single


def _group(tensor, group):
    return tensor[:, group * QUERIES:(group + 1) * QUERIES]


def test_num_query_groups_is_validated_and_off_by_default():
    for bad in (0, -1, 1.5, True, "13"):
        with pytest.raises(ValueError, match="num_query_groups"):
            DetrCustomConfig(**tiny_kwargs(num_query_groups=bad))
    model = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs()))
    assert model.config.num_query_groups == 1 and len(model.model.extra_query_embeds) == 0
    assert not any("extra_query" in key for key in model.state_dict())     # 1 group: the same keys as before
    assert "query_groups.py" in remote_code_files()                          # the new file travels as remote code


def test_block_diagonal_mask():
    mask = group_attention_mask(3, 2)
    assert mask.dtype == torch.bool and mask.shape == (6, 6)
    assert mask.tolist() == [[i // 2 == j // 2 for j in range(6)] for i in range(6)]


def test_group_zero_in_training_equals_the_one_group_model():
    grouped, single = _pair(3)
    grouped.train(), single.train()
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        out, reference = grouped(pixel_values, pixel_mask), single(pixel_values, pixel_mask)
    assert out.logits.shape == (2, 3 * QUERIES, 4) and out.pred_boxes.shape == (2, 3 * QUERIES, 4)
    assert out.last_hidden_state.shape == (2, 3 * QUERIES, 32)
    # masked softmax over 30 keys vs plain softmax over 10: the same terms, float rounding only
    assert torch.allclose(_group(out.logits, 0), reference.logits, atol=1e-5)
    assert torch.allclose(_group(out.pred_boxes, 0), reference.pred_boxes, atol=1e-6)
    assert torch.allclose(_group(out.auxiliary_outputs[0]["logits"], 0), reference.auxiliary_outputs[0]["logits"],
                          atol=1e-5)
    # the other groups are other queries: other predictions
    assert (_group(out.logits, 1) - reference.logits).abs().max() > 1e-2


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_group_never_sees_the_other_groups(implementation):
    model = _model(3).train()
    model.set_attn_implementation(implementation)
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        before = model(pixel_values, pixel_mask)
        self_attention = model(pixel_values, pixel_mask, output_attentions=True).decoder_attentions[0]
        model.model.extra_query_embeds[0].weight.mul_(-2.0).add_(1.0)         # group 1's queries change
        after = model(pixel_values, pixel_mask)
    for group in (0, 2):
        assert torch.equal(_group(before.logits, group), _group(after.logits, group))
        assert torch.equal(_group(before.pred_boxes, group), _group(after.pred_boxes, group))
    assert (_group(before.logits, 1) - _group(after.logits, 1)).abs().max() > 1e-2
    # the weights: zero outside the query's group, [batch, heads, 30, 30]
    outside = ~group_attention_mask(3, QUERIES)
    assert self_attention[..., outside].abs().max() == 0
    assert torch.allclose(self_attention.sum(-1), torch.ones(2, 2, 3 * QUERIES), atol=1e-5)


def test_eval_runs_only_the_first_group_and_equals_the_one_group_model():
    grouped, single = _pair(13)
    grouped.eval(), single.eval()
    pixel_values, pixel_mask, labels = padded_batch()
    with torch.no_grad():
        out = grouped(pixel_values, pixel_mask, labels=labels, output_attentions=True, output_hidden_states=True)
        reference = single(pixel_values, pixel_mask, labels=labels, output_attentions=True, output_hidden_states=True)
    assert out.logits.shape == (2, QUERIES, 4) and out.decoder_attentions[0].shape == (2, 2, QUERIES, QUERIES)
    assert torch.equal(out.logits, reference.logits) and torch.equal(out.pred_boxes, reference.pred_boxes)
    assert torch.equal(out.loss, reference.loss)
    assert out.loss_dict.keys() == reference.loss_dict.keys()
    assert all(torch.equal(out.loss_dict[name], reference.loss_dict[name]) for name in out.loss_dict)


def test_loss_is_the_mean_over_groups_of_the_one_group_loss():
    model = _model(3).train()
    pixel_values, pixel_mask, labels = padded_batch()
    out = model(pixel_values, pixel_mask, labels=labels)
    per_group = []
    for group in range(3):
        auxiliary = [{name: _group(value, group) for name, value in layer.items()} for layer in out.auxiliary_outputs]
        per_group.append(model.criterion(_group(out.logits, group), _group(out.pred_boxes, group), labels, auxiliary))
    losses = torch.stack([loss for loss, _ in per_group])
    assert losses.std() > 1e-3                                                 # the groups' losses differ
    assert torch.allclose(out.loss, losses.mean(), rtol=1e-5)
    assert out.loss_dict.keys() == per_group[0][1].keys()                       # the usual names, aux ones too
    for name, value in out.loss_dict.items():
        assert torch.allclose(value, torch.stack([terms[name] for _, terms in per_group]).mean(), rtol=1e-5), name


def test_gradients_reach_every_group():
    model = _model(4).train()
    pixel_values, pixel_mask, labels = padded_batch()
    model(pixel_values, pixel_mask, labels=labels).loss.backward()
    tables = [model.model.query_embed] + list(model.model.extra_query_embeds)
    assert all(table.weight.grad is not None and table.weight.grad.abs().sum() > 0 for table in tables)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _model(3).train()
    pixel_values, pixel_mask, labels = padded_batch()
    (_, plain), (_, checkpointed) = gradients_with_and_without_checkpointing(model, pixel_values, pixel_mask,
                                                                             labels=labels)
    assert all(layer.gradient_checkpointing for layer in model.model.decoder.layers)
    assert "model.extra_query_embeds.1.weight" in plain and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6), name


def test_one_group_checkpoint_starts_the_extra_groups_from_its_queries(tmp_path):
    single = randomize_(DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs(**NO_DROPOUT))))
    single.save_pretrained(tmp_path)
    torch.manual_seed(0)
    grouped, info = DetrCustomForObjectDetection.from_pretrained(
        tmp_path, num_query_groups=4, output_loading_info=True)
    assert grouped.config.num_query_groups == 4 and len(info["missing_keys"]) == 3
    first = grouped.model.query_embed.weight
    assert torch.equal(first, single.model.query_embed.weight)
    extras = [embed.weight for embed in grouped.model.extra_query_embeds]
    for extra in extras:                 # the first group's queries plus a little noise, not a random table
        relative = ((extra - first).std() / first.std()).item()
        assert 0.5 * GROUP_INIT_NOISE < relative < 1.5 * GROUP_INIT_NOISE
    assert not torch.equal(extras[0], extras[1])                               # the groups are not copies
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        expected = single.eval()(pixel_values, pixel_mask).logits
        assert torch.equal(grouped.eval()(pixel_values, pixel_mask).logits, expected)
        trained = grouped.train()(pixel_values, pixel_mask)
    # the extra groups start as near-copies of the trained queries: their predictions are close to group 0's
    for group in (1, 2, 3):
        assert (_group(trained.pred_boxes, group) - _group(trained.pred_boxes, 0)).abs().mean() < 0.05
    # the training script's fine-tuning call (a new class head) does the same
    finetuned = DetrCustomForObjectDetection.from_pretrained(tmp_path, num_query_groups=2, num_labels=5,
                                                             ignore_mismatched_sizes=True)
    relative = (finetuned.model.extra_query_embeds[0].weight - first).std() / first.std()
    assert finetuned.class_embed.out_features == 6 and relative.item() < 1.5 * GROUP_INIT_NOISE


def test_save_load_round_trip_and_other_group_counts(tmp_path):
    model = _model(3)
    model.save_pretrained(tmp_path)
    saved = model.state_dict()
    loaded, info = DetrCustomForObjectDetection.from_pretrained(tmp_path, output_loading_info=True)
    assert loaded.config.num_query_groups == 3 and not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(saved[key], value) for key, value in loaded.state_dict().items())
    pixel_values, pixel_mask, labels = padded_batch()
    with torch.no_grad():
        expected = model.train()(pixel_values, pixel_mask, labels=labels)
        assert torch.equal(loaded.train()(pixel_values, pixel_mask, labels=labels).loss, expected.loss)
    extra = "model.extra_query_embeds.{}.weight".format
    # fewer groups: the first ones are kept, the rest dropped silently (ignored unexpected keys)
    for groups in (1, 2):
        fewer, info = DetrCustomForObjectDetection.from_pretrained(
            tmp_path, num_query_groups=groups, output_loading_info=True)
        assert not info["unexpected_keys"] and not info["missing_keys"]
        assert fewer.state_dict().keys() == {key for key in saved if key != extra(1) and (groups == 2
                                                                                          or key != extra(0))}
        assert all(torch.equal(saved[key], value) for key, value in fewer.state_dict().items())
    # more groups: the saved ones are loaded, the new ones start from the first group
    more, info = DetrCustomForObjectDetection.from_pretrained(tmp_path, num_query_groups=5, output_loading_info=True)
    assert info["missing_keys"] == {extra(2), extra(3)}
    state = more.state_dict()
    assert torch.equal(state[extra(0)], saved[extra(0)]) and torch.equal(state[extra(1)], saved[extra(1)])
    first = saved["model.query_embed.weight"]
    assert ((state[extra(3)] - first).std() / first.std()).item() < 1.5 * GROUP_INIT_NOISE


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_masked_self_attention_matches_lw_detr_group_attention(implementation):
    # transformers' LW-DETR runs group DETR by moving the groups into the batch (no mask): the same definition
    groups, queries, d_model = 3, 5, 32
    reference = LwDetrAttention(LwDetrConfig(d_model=d_model, decoder_self_attention_heads=2, group_detr=groups,
                                             attention_dropout=0.0), layer_idx=0).train()
    config = DetrCustomConfig(**tiny_kwargs(**NO_DROPOUT))
    config._attn_implementation = implementation
    ours = DetrCustomAttention(d_model, 2, 0.0, config).train()
    randomize_(reference, seed=1)
    ours.load_state_dict({key.replace("o_proj", "out_proj"): value for key, value in reference.state_dict().items()})
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, groups * queries, d_model, generator=generator)
    position = torch.randn(2, groups * queries, d_model, generator=generator)
    expected, _ = reference(hidden, position_embeddings=position)
    attended, _ = ours(hidden + position, hidden + position, hidden, None, False,
                       group_attention_mask(groups, queries))
    assert torch.allclose(attended, expected, atol=1e-5)


def test_box_loss_normalization_matches_lw_detr():
    # LW-DETR's criterion averages the groups (num_boxes * group_detr); with the class cost off both matchers
    # solve the same box assignment, so the box terms of every layer must agree (its class loss is a focal one)
    groups = 3
    config = DetrCustomConfig(**tiny_kwargs(class_cost=0.0))
    reference = LwDetrImageLoss(LwDetrHungarianMatcher(class_cost=0.0, bbox_cost=5.0, giou_cost=2.0),
                                num_classes=3, focal_alpha=0.25, losses=["boxes"], group_detr=groups).train()
    generator = torch.Generator().manual_seed(0)
    layers = [{"logits": torch.randn(2, groups * QUERIES, 4, generator=generator),
               "pred_boxes": torch.rand(2, groups * QUERIES, 4, generator=generator) * 0.5 + 0.25}
              for _ in range(2)]
    _, _, labels = padded_batch()
    _, ours = DetrCustomLoss(config)(layers[1]["logits"], layers[1]["pred_boxes"], labels, layers[:1],
                                     num_query_groups=groups)
    sigmoid_head = [{"logits": layer["logits"][..., :3], "pred_boxes": layer["pred_boxes"]} for layer in layers]
    theirs = reference({**sigmoid_head[1], "auxiliary_outputs": sigmoid_head[:1]}, labels)
    for name in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"):
        assert torch.allclose(ours[name], theirs[name], rtol=1e-5), name


# the deformable decoder's queries carry reference boxes: each group has its own (learned, or selected by its own
# query selection heads), and denoising queries see the first group only
DEFORMABLE = dict(decoder_type="deformable", num_feature_levels=2, classification_loss="focal")
DEFORMABLE_VARIANTS = {
    "learned-boxes": {},
    "learned-boxes-denoising": {"num_denoising": 6},
    "two-stage": {"two_stage": True, "classification_loss": "varifocal"},
    "rt-detr": {"two_stage": True, "classification_loss": "varifocal", "encoder_type": "hybrid", "num_denoising": 6},
    "learn-initial-query": {"two_stage": True, "learn_initial_query": True},
}


def _deformable_pair(num_groups, variant, **overrides):
    """A K-group deformable model and a 1-group model with the same weights (the first group's)."""
    options = {**DEFORMABLE, **DEFORMABLE_VARIANTS[variant], **overrides}
    grouped = _model(num_groups, **options)
    single = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs(**NO_DROPOUT, **options)))
    missing, unexpected = single.load_state_dict(grouped.state_dict(), strict=False)
    assert missing == [] and unexpected and all(".extra_" in key for key in unexpected)
    return grouped, single


def _extra_parameters(model, group) -> dict:
    """{name: parameter} of group `group` >= 1 of a deformable model."""
    return {name: p for name, p in model.named_parameters() if re.search(rf"\.extra_\w+\.{group - 1}(\.|$)", name)}


def _detector_outputs(model, pixel_values, pixel_mask, labels, seed=5):
    torch.manual_seed(seed)   # the denoising draws
    return model.model(pixel_values, pixel_mask, labels=labels)


@pytest.mark.parametrize("variant", DEFORMABLE_VARIANTS)
def test_deformable_group_zero_and_denoising_in_training_equal_the_one_group_model(variant):
    grouped, single = _deformable_pair(3, variant)
    grouped.train(), single.train()
    pixel_values, pixel_mask, labels = padded_batch()
    with torch.no_grad():
        out = _detector_outputs(grouped, pixel_values, pixel_mask, labels)
        reference = _detector_outputs(single, pixel_values, pixel_mask, labels)
    assert out.logits.shape[2] == 3 * QUERIES and out.pred_boxes.shape[2] == 3 * QUERIES
    group_zero = out.logits[:, :, :QUERIES]
    assert torch.allclose(group_zero, reference.logits, atol=1e-5)
    assert torch.allclose(out.pred_boxes[:, :, :QUERIES], reference.pred_boxes, atol=1e-6)
    assert (out.logits[:, :, QUERIES:2 * QUERIES] - reference.logits).abs().max() > 1e-2   # other queries
    if grouped.config.two_stage:   # each group its own selection: its own proposals
        assert out.enc_logits.shape[1] == 3 * QUERIES
        assert torch.allclose(out.enc_logits[:, :QUERIES], reference.enc_logits, atol=1e-5)
        assert not torch.allclose(out.enc_pred_boxes[:, QUERIES:2 * QUERIES], reference.enc_pred_boxes, atol=1e-3)
    if grouped.config.num_denoising:   # the denoising queries see what they see without groups
        assert out.denoising["indices"] and out.denoising["num_groups"] == reference.denoising["num_groups"]
        assert torch.allclose(out.denoising["logits"], reference.denoising["logits"], atol=1e-5)
        assert torch.allclose(out.denoising["pred_boxes"], reference.denoising["pred_boxes"], atol=1e-6)
    else:
        assert out.denoising is None


@pytest.mark.parametrize("variant", ["learned-boxes-denoising", "rt-detr", "learn-initial-query"])
def test_a_deformable_group_never_sees_the_other_groups(variant):
    model = _model(3, **{**DEFORMABLE, **DEFORMABLE_VARIANTS[variant]}).train()
    pixel_values, pixel_mask, labels = padded_batch()
    with torch.no_grad():
        before = _detector_outputs(model, pixel_values, pixel_mask, labels)
        changed = _extra_parameters(model, 1)
        assert changed
        for parameter in changed.values():                           # group 1 changes
            parameter.mul_(-2.0).add_(0.5)
        after = _detector_outputs(model, pixel_values, pixel_mask, labels)
    for group in (0, 2):
        rows = slice(group * QUERIES, (group + 1) * QUERIES)
        assert torch.equal(before.logits[:, :, rows], after.logits[:, :, rows])
        assert torch.equal(before.pred_boxes[:, :, rows], after.pred_boxes[:, :, rows])
    rows = slice(QUERIES, 2 * QUERIES)
    assert (before.logits[:, :, rows] - after.logits[:, :, rows]).abs().max() > 1e-2
    if model.config.num_denoising:
        assert torch.equal(before.denoising["logits"], after.denoising["logits"])


def test_deformable_groups_mask_with_denoising():
    denoising = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    mask = with_denoising_mask(denoising, num_denoising=2, num_groups=3, num_queries=2)
    assert mask.shape == (8, 8)
    assert torch.equal(mask[:4, :4], denoising)                       # denoising + first group: as without groups
    assert not mask[:2, 4:].any() and not mask[4:, :2].any()          # the other groups: no denoising either way
    assert torch.equal(mask[2:, 2:], group_attention_mask(3, 2))      # the groups: block diagonal


@pytest.mark.parametrize("variant", ["learned-boxes", "rt-detr"])
def test_deformable_eval_runs_only_the_first_group(variant):
    grouped, single = _deformable_pair(4, variant)
    grouped.eval(), single.eval()
    pixel_values, pixel_mask, labels = padded_batch()
    with torch.no_grad():
        out = grouped(pixel_values, pixel_mask, labels=labels)
        reference = single(pixel_values, pixel_mask, labels=labels)
    assert out.logits.shape[1] == QUERIES
    assert torch.equal(out.logits, reference.logits) and torch.equal(out.pred_boxes, reference.pred_boxes)
    assert torch.equal(out.loss, reference.loss)


@pytest.mark.parametrize("variant", ["learned-boxes-denoising", "rt-detr"])
def test_deformable_loss_is_the_group_mean_and_denoising_terms_are_the_one_group_model(variant):
    grouped, single = _deformable_pair(3, variant)
    grouped.train(), single.train()
    pixel_values, pixel_mask, labels = padded_batch()
    with torch.no_grad():
        outputs = _detector_outputs(grouped, pixel_values, pixel_mask, labels)
        torch.manual_seed(5)
        out = grouped(pixel_values, pixel_mask, labels=labels)
        torch.manual_seed(5)
        reference = single(pixel_values, pixel_mask, labels=labels)
    per_group = []
    for group in range(3):
        rows = slice(group * QUERIES, (group + 1) * QUERIES)
        encoder = None
        if outputs.enc_logits is not None:
            encoder = {"logits": outputs.enc_logits[:, rows], "pred_boxes": outputs.enc_pred_boxes[:, rows]}
        auxiliary = [{"logits": outputs.logits[0, :, rows], "pred_boxes": outputs.pred_boxes[0, :, rows]}]
        per_group.append(grouped.criterion(outputs.logits[-1, :, rows], outputs.pred_boxes[-1, :, rows], labels,
                                           auxiliary, encoder_outputs=encoder)[1])
    denoising_terms = {name for name in out.loss_dict if "_dn_" in name}
    assert denoising_terms and out.loss_dict.keys() == reference.loss_dict.keys()
    assert out.loss_dict.keys() - denoising_terms == per_group[0].keys()
    for name in denoising_terms:                     # the denoising terms: a 1-group model's
        assert torch.allclose(out.loss_dict[name], reference.loss_dict[name], rtol=1e-5, atol=1e-6), name
    for name in per_group[0]:                        # the matching terms: the mean over groups
        mean = torch.stack([terms[name] for terms in per_group]).mean()
        assert torch.allclose(out.loss_dict[name], mean, rtol=1e-5), name
    assert torch.stack([terms["loss_giou"] for terms in per_group]).std() > 1e-3   # the groups differ


@pytest.mark.parametrize("variant", ["learned-boxes-denoising", "rt-detr", "learn-initial-query"])
def test_deformable_gradients_reach_every_group(variant):
    model = _model(3, **{**DEFORMABLE, **DEFORMABLE_VARIANTS[variant]}).train()
    pixel_values, pixel_mask, labels = padded_batch()
    model(pixel_values, pixel_mask, labels=labels).loss.backward()
    for group in (1, 2):
        parameters = _extra_parameters(model, group)
        assert parameters
        # the selection's box head starts at zero deltas: its first layers get no gradient at the first step
        silent = [name for name, p in parameters.items()
                  if (p.grad is None or not p.grad.abs().sum() > 0) and "enc_bbox_head.0" not in name
                  and "enc_bbox_head.2" not in name]
        assert not silent, silent


def test_deformable_checkpoint_with_one_group_starts_the_others_from_it(tmp_path):
    options = {**DEFORMABLE, **DEFORMABLE_VARIANTS["rt-detr"]}
    single = randomize_(DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs(**NO_DROPOUT, **options))))
    single.save_pretrained(tmp_path / "one")
    torch.manual_seed(0)
    grouped, info = DetrCustomForObjectDetection.from_pretrained(tmp_path / "one", num_query_groups=3,
                                                                 output_loading_info=True)
    assert info["missing_keys"] and all(".extra_query_selections." in key for key in info["missing_keys"])
    first = dict(grouped.model.query_selection.named_parameters())
    for selection in grouped.model.extra_query_selections:
        for name, parameter in selection.named_parameters():
            if first[name].std() > 0:          # near the first group's, not a fresh init
                relative = ((parameter - first[name]).std() / first[name].std()).item()
                if first[name].numel() >= 100:  # (the std of a few noise draws is itself noisy)
                    assert 0.5 * GROUP_INIT_NOISE < relative < 1.5 * GROUP_INIT_NOISE, name
                assert 0 < relative < 3 * GROUP_INIT_NOISE, name
            else:                              # constant (the box head's zero deltas): copied
                assert torch.equal(parameter, first[name]), name
    pixel_values, pixel_mask, labels = padded_batch()
    with torch.no_grad():
        expected = single.eval()(pixel_values, pixel_mask).logits
        assert torch.equal(grouped.eval()(pixel_values, pixel_mask).logits, expected)

    # the extra groups select boxes near the first group's (not the same: the noise reorders near ties and moves
    # the box deltas a little), much nearer than fresh selection heads do
    def distance_to_first_group(model):   # per selected box of group 1, the nearest of group 0's
        with torch.no_grad():
            boxes = _detector_outputs(model.train(), pixel_values, pixel_mask, labels).enc_pred_boxes
        return torch.cdist(boxes[:, QUERIES:2 * QUERIES], boxes[:, :QUERIES]).min(-1).values.median()

    fresh = DetrCustomForObjectDetection(grouped.config)
    fresh.load_state_dict({k: v for k, v in grouped.state_dict().items() if ".extra_" not in k}, strict=False)
    # (deterministic: the extra groups' noise is drawn in sorted key order; 0.079 vs 0.181 on this config)
    assert distance_to_first_group(grouped) < 0.6 * distance_to_first_group(fresh)
    # back to fewer groups: the extra groups' keys are dropped without a warning; and the learned-box variant
    grouped.save_pretrained(tmp_path / "three")
    fewer, info = DetrCustomForObjectDetection.from_pretrained(tmp_path / "three", num_query_groups=2,
                                                               output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"] and len(fewer.model.extra_query_selections) == 1
    learned = _model(3, **DEFORMABLE)
    learned.save_pretrained(tmp_path / "learned")
    more, info = DetrCustomForObjectDetection.from_pretrained(tmp_path / "learned", num_query_groups=4,
                                                              output_loading_info=True)
    assert info["missing_keys"] == {"model.extra_query_embeds.2.weight", "model.extra_reference_boxes.2"}
    first = learned.model.reference_boxes
    assert torch.equal(more.model.extra_reference_boxes[0], learned.model.extra_reference_boxes[0])
    relative = ((more.model.extra_reference_boxes[2] - first).std() / first.std()).item()
    assert 0.5 * GROUP_INIT_NOISE < relative < 1.5 * GROUP_INIT_NOISE


def test_deformable_groups_through_the_training_script(tmp_path, data_dir):
    from tiny_run import run, write_config

    run(write_config(tmp_path / "new", data_dir, max_steps=2, eval_steps=2, decoder_type="deformable",
                     encoder_type="hybrid", num_feature_levels=3, decoder_n_points=2,
                     classification_loss="varifocal", two_stage=True, num_denoising=20, num_query_groups=3))
    model = DetrCustomForObjectDetection.from_pretrained(tmp_path / "new" / "run" / "last")
    assert model.config.num_query_groups == 3 and len(model.model.extra_query_selections) == 2
