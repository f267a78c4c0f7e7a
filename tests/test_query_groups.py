"""Query groups (Group DETR, `config.num_query_groups`): the mask keeps groups apart, eval runs one group, the loss
is the mean of the groups' 1-group losses, checkpoints with other group counts load; parity with transformers'
LW-DETR (attention of its group-DETR decoder, box-loss normalization of its criterion)."""
import pytest
import torch
from transformers import LwDetrConfig
from transformers.loss.loss_lw_detr import LwDetrHungarianMatcher, LwDetrImageLoss
from transformers.models.lw_detr.modeling_lw_detr import LwDetrAttention

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.attention_mha import DetrCustomAttention
from modeling_detr_custom.loss_detr_custom import DetrCustomLoss
from modeling_detr_custom.query_groups import GROUP_INIT_NOISE, group_attention_mask, grouped_loss
from modeling_detr_custom.testing_utils import padded_batch, randomize_, remote_code_files, tiny_kwargs

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
    model(pixel_values, pixel_mask, labels=labels).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.decoder.layers)
    model(pixel_values, pixel_mask, labels=labels).loss.backward()
    assert "model.extra_query_embeds.1.weight" in plain
    for name, grad in plain.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-6), name


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
    _, ours = grouped_loss(DetrCustomLoss(config), layers[1]["logits"], layers[1]["pred_boxes"], labels,
                           layers[:1], groups)
    sigmoid_head = [{"logits": layer["logits"][..., :3], "pred_boxes": layer["pred_boxes"]} for layer in layers]
    theirs = reference({**sigmoid_head[1], "auxiliary_outputs": sigmoid_head[:1]}, labels)
    for name in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"):
        assert torch.allclose(ours[name], theirs[name], rtol=1e-5), name
