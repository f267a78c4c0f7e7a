"""Hybrid matching (`criterion="hybrid"`, H-DETR): the first query group gets the one-to-one DETR loss (denoising
included) exactly as a 1-group model, the other groups together are matched one-to-many to targets repeated
`one_to_many_repeats` times (as H-DETR's `copy.deepcopy(targets)` + `repeat(k)`), normalized by their own count;
eval mode and the first group's outputs are untouched; the config refuses what does not fit."""
import pytest
import torch

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.loss_detr_custom import DetrCustomLoss
from modeling_detr_custom.loss_hybrid import O2M_SUFFIX, HybridMatchingLoss, repeat_targets
from modeling_detr_custom.testing_utils import padded_batch, randomize_, remote_code_files, tiny_kwargs

QUERIES = tiny_kwargs()["num_queries"]
RT_DETR = dict(decoder_type="deformable", num_feature_levels=2, two_stage=True, classification_loss="varifocal",
               encoder_type="hybrid", num_denoising=6, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def _model(criterion, groups=3, repeats=2, seed=0, **overrides):
    extra = {"one_to_many_repeats": repeats} if criterion == "hybrid" else {}
    config = DetrCustomConfig(**tiny_kwargs(**RT_DETR, num_query_groups=groups, criterion=criterion, **extra,
                                            **overrides))
    return randomize_(DetrCustomForObjectDetection(config), seed=seed)


def _outputs(model, seed=5):
    pixel_values, pixel_mask, labels = padded_batch()
    torch.manual_seed(seed)   # the denoising draws
    return model.model(pixel_values, pixel_mask, labels=labels), labels


def _sets(outputs, rows):
    """(logits, boxes, auxiliary, encoder) of the query rows `rows`, as the criterion takes them."""
    auxiliary = [{"logits": outputs.logits[layer, :, rows], "pred_boxes": outputs.pred_boxes[layer, :, rows]}
                 for layer in range(outputs.logits.shape[0] - 1)]
    encoder = {"logits": outputs.enc_logits[:, rows], "pred_boxes": outputs.enc_pred_boxes[:, rows]}
    return outputs.logits[-1, :, rows], outputs.pred_boxes[-1, :, rows], auxiliary, encoder


def test_the_first_group_gets_the_one_to_one_loss_and_the_others_the_repeated_targets():
    model = _model("hybrid", repeats=2).train()
    with torch.no_grad():
        outputs, labels = _outputs(model)
        torch.manual_seed(5)
        out = model(*padded_batch()[:2], labels=labels)
    plain = DetrCustomLoss(model.config)
    logits, boxes, auxiliary, encoder = _sets(outputs, slice(0, QUERIES))
    one_to_one = {name: value for name, value in out.loss_dict.items() if not name.endswith(O2M_SUFFIX)}
    _, expected = plain(logits, boxes, labels, auxiliary, encoder_outputs=encoder)
    for name, value in expected.items():   # the matching terms: a 1-group model's on the first group
        assert torch.allclose(one_to_one[name], value, rtol=1e-5, atol=1e-6), name
    assert any("_dn_" in name for name in one_to_one)          # denoising stays with the first group
    assert not any("_dn_" in name for name in out.loss_dict if name.endswith(O2M_SUFFIX))
    # H-DETR's one-to-many targets: every image's targets repeated k times, one criterion call on the other groups
    repeated = [{**t, "class_labels": t["class_labels"].repeat(2), "boxes": t["boxes"].repeat(2, 1)} for t in labels]
    logits, boxes, auxiliary, encoder = _sets(outputs, slice(QUERIES, None))
    _, expected = plain(logits, boxes, repeated, auxiliary, encoder_outputs=encoder)
    for name, value in expected.items():
        assert torch.allclose(out.loss_dict[name + O2M_SUFFIX], value, rtol=1e-5, atol=1e-6), name
    weighted = sum(out.loss_dict[name] * weight for name, weight in _all_weights(model, out.loss_dict))
    assert torch.allclose(out.loss, weighted, rtol=1e-5)        # both losses count, with weight 1


def _all_weights(model, loss_dict):
    for name in loss_dict:
        base = name.removesuffix(O2M_SUFFIX).split("_dn_")[0].removesuffix("_enc")
        base = base.rsplit("_", 1)[0] if base.rsplit("_", 1)[-1].isdigit() else base
        if base in model.criterion.weights:
            yield name, model.criterion.weights[base]


def test_every_target_is_claimed_by_k_queries_of_the_one_to_many_groups():
    model = _model("hybrid", repeats=3).train()
    with torch.no_grad():
        outputs, labels = _outputs(model)
    logits, boxes, _, _ = _sets(outputs, slice(QUERIES, None))
    repeated = repeat_targets(labels, 3, logits.shape[1])
    indices = model.criterion.matcher(logits.float(), boxes.float(), repeated)
    for (queries, targets), target in zip(indices, labels):
        count = len(target["class_labels"])
        assert len(set(queries.tolist())) == 3 * count                      # distinct queries
        assert sorted((targets % count).tolist()) == sorted(list(range(count)) * 3)   # each object three times


def test_repeats_are_capped_by_the_one_to_many_queries_and_empty_images_pass():
    boxes = torch.rand(4, 4)
    labels = [{"class_labels": torch.zeros(4, dtype=torch.long), "boxes": boxes, "image_id": 7},
              {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    repeated = repeat_targets(labels, 6, num_queries=10)
    assert len(repeated[0]["class_labels"]) == 8 and torch.equal(repeated[0]["boxes"][4:], boxes)   # 2 x fits
    assert repeated[0]["image_id"] == 7 and len(repeated[1]["class_labels"]) == 0
    assert len(repeat_targets(labels, 6, num_queries=3)[0]["class_labels"]) == 4   # at least once
    model = _model("hybrid", repeats=6).train()   # more repeats than the 2 x 3 = 6 extra queries hold: still trains
    pixel_values, pixel_mask, labels = padded_batch()
    model(pixel_values, pixel_mask, labels=labels).loss.backward()


def test_the_one_to_many_groups_get_gradients_and_inference_is_the_first_group():
    model = _model("hybrid").train()
    pixel_values, pixel_mask, labels = padded_batch()
    model(pixel_values, pixel_mask, labels=labels).loss.backward()
    extra = {name: p for name, p in model.named_parameters() if "extra_query_selections" in name}
    assert extra and all(p.grad is not None and p.grad.abs().sum() > 0 for p in extra.values())
    plain = _model("hungarian")   # the same weights: eval outputs and loss are the plain criterion's
    plain.load_state_dict(model.state_dict())
    plain.eval()
    model.eval()
    with torch.no_grad():
        ours, theirs = model(pixel_values, pixel_mask, labels=labels), plain(pixel_values, pixel_mask, labels=labels)
    assert ours.logits.shape[1] == QUERIES
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.pred_boxes, theirs.pred_boxes)
    assert torch.equal(ours.loss, theirs.loss) and not any(n.endswith(O2M_SUFFIX) for n in ours.loss_dict)


def test_hybrid_model_saves_and_loads(tmp_path):
    model = _model("hybrid", repeats=4).eval()
    model.save_pretrained(tmp_path)
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.criterion, HybridMatchingLoss) and loaded.config.one_to_many_repeats == 4
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        assert torch.equal(model(pixel_values, pixel_mask).logits, loaded(pixel_values, pixel_mask).logits)
    assert "loss_hybrid.py" in remote_code_files()


@pytest.mark.parametrize("overrides, message", [
    (dict(criterion="hybrid"), "set num_query_groups >= 2"),
    (dict(criterion="hybrid", num_query_groups=2, one_to_many_repeats=0), "one_to_many_repeats must be an integer"),
    (dict(num_query_groups=2, one_to_many_repeats=3), "only the criteria \\['hybrid'\\] read it"),
])
def test_the_config_refuses_what_does_not_fit(overrides, message):
    with pytest.raises(ValueError, match=message):
        DetrCustomConfig(**tiny_kwargs(**RT_DETR, **overrides))
