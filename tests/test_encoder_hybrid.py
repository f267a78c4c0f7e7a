"""RT-DETR's cross-scale fusion (encoder_type="hybrid", encoder_hybrid.py): the fused maps equal transformers'
RTDetrHybridEncoder with the same weights; sizes that are not powers of two; the model variant's config, gradients,
saving, remote code and training CLI."""
import pytest
import torch
from transformers import RTDetrConfig
from transformers.models.rt_detr.modeling_rt_detr import RTDetrHybridEncoder

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.encoder_hybrid import DetrCustomCrossScaleFusion
from modeling_detr_custom.testing_utils import padded_batch, randomize_, tiny_kwargs, train_on_a_fixed_batch

ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def _config(**overrides):
    return DetrCustomConfig(**tiny_kwargs(**{**dict(decoder_type="deformable", encoder_type="hybrid",
                                                    num_feature_levels=4, classification_loss="focal",
                                                    id2label=ID2LABEL, **NO_DROPOUT), **overrides}))


def _randomize_batch_norm_(module):
    for norm in module.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.running_mean.normal_(0, 0.2)
            norm.running_var.uniform_(0.5, 1.5)
            norm.weight.data.uniform_(0.5, 1.5)
            norm.bias.data.normal_(0, 0.2)


@pytest.mark.parametrize("hidden_expansion", [1.0, 0.5])
def test_fused_maps_equal_transformers_rt_detr_hybrid_encoder(hidden_expansion):
    torch.manual_seed(0)
    d_model, shapes = 32, [(16, 20), (8, 10), (4, 5)]
    theirs = RTDetrHybridEncoder(RTDetrConfig(
        encoder_hidden_dim=d_model, encoder_in_channels=[64, 128, 256], feat_strides=[8, 16, 32], encoder_layers=0,
        hidden_expansion=hidden_expansion, activation_function="silu")).eval()
    ours = DetrCustomCrossScaleFusion(d_model, 3, hidden_expansion).eval()
    _randomize_batch_norm_(theirs)
    assert ours.load_state_dict(theirs.state_dict(), strict=True)   # transformers' module names and shapes
    maps = [torch.randn(2, d_model, h, w) for h, w in shapes]
    with torch.no_grad():
        expected = theirs(inputs_embeds=[m.clone() for m in maps]).last_hidden_state
        found = ours([m.clone() for m in maps])
    assert len(found) == 3
    for e, f in zip(expected, found):     # ours folds BatchNorm and RepVGG's branches in eval mode
        assert f.shape == e.shape and torch.allclose(f, e, atol=1e-5)
    # training mode: batch statistics, unfolded; outputs, running statistics and gradients equal theirs
    theirs.train(), ours.train()
    inputs = [[m.clone().requires_grad_(True) for m in maps] for _ in range(2)]
    expected = theirs(inputs_embeds=inputs[0]).last_hidden_state
    found = ours(inputs[1])
    for e, f in zip(expected, found):
        assert torch.allclose(f, e, atol=1e-5)
    sum(e.square().sum() for e in expected).backward()
    sum(f.square().sum() for f in found).backward()
    for e, f in zip(inputs[0], inputs[1]):
        assert torch.allclose(f.grad, e.grad, atol=1e-4, rtol=1e-4)
    their_stats = {k: v for k, v in theirs.state_dict().items() if "running" in k}
    assert all(torch.allclose(ours.state_dict()[k], v, atol=1e-6) for k, v in their_stats.items())


def test_sizes_that_do_not_halve_exactly():
    fusion = DetrCustomCrossScaleFusion(16, 3).eval()
    maps = [torch.randn(1, 16, h, w) for h, w in [(13, 9), (7, 5), (4, 3)]]   # a ResNet's strides of 100 x 70
    with torch.no_grad():
        fused = fusion(maps)
    assert [tuple(f.shape[-2:]) for f in fused] == [(13, 9), (7, 5), (4, 3)]
    with pytest.raises(ValueError, match="cross-scale fusion needs at least 2 backbone levels"):
        DetrCustomCrossScaleFusion(16, 1)


def test_the_hybrid_variant_trains_saves_and_loads(tmp_path):
    with pytest.raises(ValueError, match="encoder_type='hybrid' needs decoder_type='deformable'"):
        DetrCustomConfig(**tiny_kwargs(encoder_type="hybrid"))
    torch.manual_seed(0)
    model = randomize_(DetrCustomForObjectDetection(_config(freeze_batch_norm=False, freeze_backbone_stem=False)))
    assert len(model.model.encoder.fusion.pan_blocks) == 2                    # 3 backbone levels (ResNet strides 8-32)
    pixel_values, pixel_mask, labels = padded_batch()
    model.train()(pixel_values, pixel_mask, labels=labels).loss.backward()
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0 or not p.grad.isfinite().all())]
    assert not missing
    model.eval().save_pretrained(tmp_path)
    assert "encoder_hybrid.py" in {p.name for p in tmp_path.glob("*.py")}
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected, found = model(pixel_values, pixel_mask), loaded(pixel_values, pixel_mask)
    assert torch.equal(expected.logits, found.logits) and torch.equal(expected.pred_boxes, found.pred_boxes)


def test_it_learns_a_fixed_batch():
    torch.manual_seed(0)
    losses = train_on_a_fixed_batch(DetrCustomForObjectDetection(_config()))
    assert losses[-1] < 0.4 * losses[0], losses[::10]


def test_training_script_option_reaches_the_model(tmp_path, data_dir):
    from tiny_run import run, write_config

    run(write_config(tmp_path / "new", data_dir, max_steps=2, eval_steps=2, decoder_type="deformable",
                     encoder_type="hybrid", num_feature_levels=3, decoder_n_points=2, classification_loss="focal"))
    model = DetrCustomForObjectDetection.from_pretrained(tmp_path / "new" / "run" / "last")
    assert model.config.encoder_type == "hybrid" and model.model.encoder.fusion is not None
