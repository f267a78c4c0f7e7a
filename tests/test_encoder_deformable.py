"""The deformable encoder (encoder_type="deformable", encoder_deformable.py): parity with transformers'
DeformableDetrEncoder (same weights, padding, uneven levels), its reference points, and the model wired with it:
inits, gradients, padding never read, save / load, remote code, gradient checkpointing, bf16, the training script."""
import pytest
import torch
from transformers import DeformableDetrConfig
from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrEncoder

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.attention_deformable import DetrCustomDeformableAttention
from modeling_detr_custom.encoder_deformable import DetrCustomDeformableEncoder, encoder_reference_points
from modeling_detr_custom.multiscale import valid_ratios
from modeling_detr_custom.testing_utils import (gradients_with_and_without_checkpointing,
                                                outputs_with_garbage_in_the_padding, padded_batch, randomize_,
                                                remote_code_files, tiny_kwargs, train_on_a_fixed_batch)

NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
SHAPES = [(8, 9), (4, 5), (2, 3), (1, 1)]          # uneven levels, the last a single cell
D_MODEL, HEADS, POINTS = 32, 4, 3


def _config(**overrides):
    return DetrCustomConfig(**tiny_kwargs(**{**dict(decoder_type="deformable", encoder_type="deformable",
                                                    num_feature_levels=3, encoder_n_points=2,
                                                    classification_loss="focal", **NO_DROPOUT), **overrides}))


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_(DetrCustomForObjectDetection(_config(**overrides)), seed=seed).eval()


def _level_inputs(seed=0):
    """Flattened levels, positions and masks of two images, the second padded (its right and bottom cells)."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for height, width in SHAPES:
        mask = torch.ones(2, height, width, dtype=torch.bool)
        mask[1, (height + 1) // 2 + 1:] = False
        mask[1, :, (width + 1) // 2 + 1:] = False
        masks.append(mask)
    sequence = sum(h * w for h, w in SHAPES)
    hidden = torch.randn(2, sequence, D_MODEL, generator=generator)
    position = torch.randn(2, sequence, D_MODEL, generator=generator)
    return hidden, position, masks


def _transformers_encoder(activation="relu"):
    config = DeformableDetrConfig(d_model=D_MODEL, encoder_layers=2, encoder_attention_heads=HEADS,
                                  encoder_ffn_dim=48, encoder_n_points=POINTS, num_feature_levels=len(SHAPES),
                                  activation_function=activation, **NO_DROPOUT)
    return randomize_(DeformableDetrEncoder(config), seed=1).eval()


def _ours_with_their_weights(theirs, activation="relu"):
    config = DetrCustomConfig(**tiny_kwargs(d_model=D_MODEL, encoder_layers=2, encoder_attention_heads=HEADS,
                                            encoder_ffn_dim=48, encoder_n_points=POINTS, decoder_type="deformable",
                                            encoder_type="deformable", num_feature_levels=len(SHAPES),
                                            classification_loss="focal", activation_function=activation,
                                            **NO_DROPOUT))
    ours = DetrCustomDeformableEncoder(config, len(SHAPES)).eval()
    names = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "mlp.fc1": "linear1",
             "mlp.fc2": "linear2"}
    state = {}
    for key, value in theirs.state_dict().items():
        for old, new in names.items():
            key = key.replace(old, new)
        state[key] = value
    ours.load_state_dict(state)
    return ours


def test_reference_points_equal_transformers():
    _, _, masks = _level_inputs()
    ratios = valid_ratios(masks)
    assert ratios[1].min() < 1                                            # the second image is padded
    expected = DeformableDetrEncoder.get_reference_points(SHAPES, ratios, "cpu")
    assert torch.allclose(encoder_reference_points(SHAPES, ratios), expected, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_matches_transformers_deformable_detr_encoder(activation):
    theirs = _transformers_encoder(activation)
    ours = _ours_with_their_weights(theirs, activation)
    hidden, position, masks = _level_inputs()
    mask = torch.cat([level.flatten(1) for level in masks], 1)             # [batch, sequence]
    ratios = valid_ratios(masks)
    shapes = torch.tensor(SHAPES)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    with torch.no_grad():
        expected = theirs(inputs_embeds=hidden, attention_mask=mask, spatial_position_embeddings=position,
                          spatial_shapes=shapes, spatial_shapes_list=SHAPES, level_start_index=start,
                          valid_ratios=ratios).last_hidden_state
        memory, states, attentions = ours(hidden, position, SHAPES, ratios, mask, output_attentions=True,
                                          output_hidden_states=True)
    assert torch.allclose(memory, expected, atol=1e-5)
    assert (memory[0] - memory[1]).abs().max() > 0.1                        # not vacuous: the images differ
    assert len(states) == 3 and torch.equal(states[-1], memory)
    assert attentions[0].shape == (2, hidden.shape[1], HEADS, POINTS * len(SHAPES))
    # the mask is read: without it, the padded image's real cells change
    with torch.no_grad():
        unmasked, _, _ = ours(hidden, position, SHAPES, ratios, None)
    assert (unmasked[1] - memory[1]).abs().max() > 1e-3


def test_a_fresh_model_has_deformable_detr_inits_and_level_embeddings():
    model = DetrCustomForObjectDetection(_config())
    reference = DetrCustomDeformableAttention(32, 2, num_levels=3, num_points=2)
    for layer in model.model.encoder.layers:
        attention = layer.self_attn
        assert torch.equal(attention.sampling_offsets.bias, reference.sampling_offsets.bias)
        assert not attention.sampling_offsets.weight.any() and not attention.attention_weights.weight.any()
    level_embed = model.model.encoder.level_embed
    assert level_embed.shape == (3, 32) and 0.7 < level_embed.std() < 1.3   # N(0, 1), as Deformable DETR
    assert "encoder_deformable.py" in remote_code_files()                     # travels as remote code
    assert not any("level_embed" in key for key in DetrCustomForObjectDetection(
        _config(encoder_type="detr", encoder_n_points=4)).state_dict())       # the other encoders have none


def test_model_shapes_gradients_and_outputs():
    model = _model(freeze_batch_norm=False, freeze_backbone_stem=False).train()
    pixel_values, pixel_mask, labels = padded_batch()                      # 160 x 128, image 1 padded
    out = model(pixel_values, pixel_mask, labels=labels, output_hidden_states=True, output_attentions=True)
    shapes = [(20, 16), (10, 8), (5, 4)]
    sequence = sum(h * w for h, w in shapes)
    assert out.encoder_last_hidden_state.shape == (2, sequence, 32)
    assert len(out.encoder_hidden_states) == 3 and out.encoder_hidden_states[0].shape == (2, sequence, 32)
    assert out.encoder_attentions[0].shape == (2, sequence, 2, 2 * 3)     # heads, points x levels
    out.loss.backward()
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0 or not p.grad.isfinite().all())]
    assert not missing
    assert model.model.encoder.level_embed.grad.abs().sum() > 0


def test_the_padded_memory_is_never_read():
    pixel_values, pixel_mask, _ = padded_batch()
    clean, dirty = outputs_with_garbage_in_the_padding(_model(), pixel_values, pixel_mask)
    assert torch.allclose(clean.pred_boxes, dirty.pred_boxes, atol=1e-5)
    assert torch.allclose(clean.logits, dirty.logits, atol=1e-4)


def test_save_load_gradient_checkpointing_and_bf16(tmp_path):
    model = _model(seed=2, two_stage=True, num_denoising=6, classification_loss="varifocal")
    pixel_values, pixel_mask, labels = padded_batch()
    model.save_pretrained(tmp_path)
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model(pixel_values, pixel_mask)
        assert torch.equal(loaded(pixel_values, pixel_mask).logits, expected.logits)
        # bf16 (the backbone's; the transformer stays fp32 on CPU): close, on learned boxes (query selection's
        # top-k may pick other proposals where bf16 moves a score past another)
        plain = _model(seed=2)
        expected = plain(pixel_values, pixel_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = plain(pixel_values, pixel_mask)
    assert (bf16.pred_boxes - expected.pred_boxes).abs().max() < 0.08
    trained = _model(seed=3).train()
    (plain_loss, plain), (loss, grads) = gradients_with_and_without_checkpointing(trained, pixel_values, pixel_mask,
                                                                                  labels=labels)
    assert trained.model.encoder.layers[0].gradient_checkpointing
    assert torch.allclose(plain_loss, loss, atol=1e-6) and plain.keys() == grads.keys()
    assert all(torch.allclose(plain[n], grads[n], atol=1e-5) for n in plain)


def test_clear_errors():
    with pytest.raises(ValueError, match="encoder_type='deformable' needs decoder_type='deformable'"):
        DetrCustomConfig(**tiny_kwargs(encoder_type="deformable"))
    with pytest.raises(ValueError, match="encoder_n_points must be >= 1"):
        _config(encoder_n_points=0)


def test_it_learns_a_fixed_batch():
    torch.manual_seed(0)
    losses = train_on_a_fixed_batch(DetrCustomForObjectDetection(_config()))
    assert losses[-1] < 0.4 * losses[0], losses[::10]


def test_training_script_option_reaches_the_model(tmp_path, data_dir):
    from tiny_run import run, write_config

    run(write_config(tmp_path / "new", data_dir, max_steps=2, eval_steps=2, decoder_type="deformable",
                     encoder_type="deformable", encoder_n_points=2, num_feature_levels=3,
                     classification_loss="focal"))
    model = DetrCustomForObjectDetection.from_pretrained(tmp_path / "new" / "run" / "last")
    assert model.config.encoder_type == "deformable" and model.config.encoder_n_points == 2
    assert len(model.model.encoder.layers[0].self_attn.num_points) == 3
