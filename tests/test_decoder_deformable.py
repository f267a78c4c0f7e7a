"""Deformable decoder: parity with transformers' DeformableDetrDecoderLayer / DeformableDetrDecoder (copied weights,
with and without iterative box refinement) and RTDetrV2Decoder (query positions from the boxes), the stop-gradient
between layers, inverse_sigmoid, gradient checkpointing."""
import functools
import re

import pytest
import torch
from torch import nn
from transformers import DeformableDetrConfig, RTDetrV2Config
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrDecoder, DeformableDetrDecoderLayer, DeformableDetrMLPPredictionHead)
from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid as reference_inverse_sigmoid
from transformers.models.rt_detr_v2.modeling_rt_detr_v2 import RTDetrV2Decoder

from modeling_detr_custom import DetrCustomConfig
from modeling_detr_custom.decoder_deformable import (
    DetrCustomDeformableDecoder, DetrCustomDeformableDecoderLayer, inverse_sigmoid, refine_boxes)
from modeling_detr_custom.testing_utils import randomize_, tiny_kwargs

D_MODEL, HEADS, POINTS, LAYERS = 32, 4, 3, 3
SHAPES = [(6, 7), (3, 4), (2, 1)]
BATCH, QUERIES = 2, 5
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
# transformers' names -> ours
KEY_MAP = [(r"\.o_proj\.", ".out_proj."), (r"self_attn_layer_norm", "norm1"), (r"encoder_attn_layer_norm", "norm2"),
           (r"encoder_attn\.", "cross_attn."), (r"mlp\.fc1", "linear1"), (r"mlp\.fc2", "linear2"),
           (r"final_layer_norm", "norm3")]


def configs():
    theirs = DeformableDetrConfig(d_model=D_MODEL, decoder_attention_heads=HEADS, decoder_ffn_dim=64,
                                  num_feature_levels=len(SHAPES), decoder_n_points=POINTS, decoder_layers=LAYERS,
                                  **NO_DROPOUT)
    ours = DetrCustomConfig(**tiny_kwargs(d_model=D_MODEL, decoder_attention_heads=HEADS, decoder_ffn_dim=64,
                                          decoder_layers=LAYERS, **NO_DROPOUT))
    return theirs, ours


def converted(state_dict):
    result = {}
    for key, value in state_dict.items():
        for pattern, replacement in KEY_MAP:
            key = re.sub(pattern, replacement, key)
        result[key] = value
    return result


def make_inputs(reference_dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sequence = sum(h * w for h, w in SHAPES)
    query = torch.randn(BATCH, QUERIES, D_MODEL, generator=generator)
    query_pos = torch.randn(BATCH, QUERIES, D_MODEL, generator=generator)
    memory = torch.randn(BATCH, sequence, D_MODEL, generator=generator)
    reference = torch.rand(BATCH, QUERIES, reference_dim, generator=generator) * 0.6 + 0.2
    valid_ratios = torch.ones(BATCH, len(SHAPES), 2)
    valid_ratios[1] = torch.rand(len(SHAPES), 2, generator=generator) * 0.4 + 0.5   # image 1 padded
    mask = torch.ones(BATCH, sequence, dtype=torch.bool)
    start = 0
    for level, (height, width) in enumerate(SHAPES):
        cells = torch.ones(height, width, dtype=torch.bool)
        cells[round(height * valid_ratios[1, level, 1].item()):] = False
        cells[:, round(width * valid_ratios[1, level, 0].item()):] = False
        mask[1, start:start + height * width] = cells.flatten()
        start += height * width
    return query, query_pos, reference, memory, valid_ratios, mask


def spatial_inputs():
    shapes = torch.tensor(SHAPES)
    return shapes, torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])


def test_layer_matches_transformers():
    their_config, our_config = configs()
    theirs = randomize_(DeformableDetrDecoderLayer(their_config)).eval()
    ours = DetrCustomDeformableDecoderLayer(our_config, len(SHAPES), POINTS).eval()
    ours.load_state_dict(converted(theirs.state_dict()))
    query, query_pos, reference, memory, valid_ratios, mask = make_inputs(4)
    level_reference = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
    shapes, level_start_index = spatial_inputs()
    with torch.no_grad():
        expected = theirs(query, query_pos, level_reference, shapes, SHAPES, level_start_index, memory, mask)
        output, _ = ours(query, query_pos, level_reference, memory, SHAPES, mask)
    assert expected.std() > 0.5
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def box_heads(seed=1):
    torch.manual_seed(seed)
    return randomize_(nn.ModuleList(DeformableDetrMLPPredictionHead(D_MODEL, D_MODEL, 4, 3) for _ in range(LAYERS)))


@pytest.mark.parametrize("reference_dim", [2, 4])
@pytest.mark.parametrize("refine", [True, False])
def test_decoder_matches_transformers(reference_dim, refine):
    their_config, our_config = configs()
    theirs = randomize_(DeformableDetrDecoder(their_config)).eval()
    heads = box_heads() if refine else None
    theirs.bbox_embed = heads
    ours = DetrCustomDeformableDecoder(our_config, len(SHAPES), POINTS).eval()
    # the box heads belong to the model (transformers attaches them to its decoder); ours are passed in
    ours.load_state_dict({k: v for k, v in converted(theirs.state_dict()).items() if not k.startswith("bbox_embed")})
    query, query_pos, reference, memory, valid_ratios, mask = make_inputs(reference_dim)
    shapes, level_start_index = spatial_inputs()
    with torch.no_grad():
        expected = theirs(inputs_embeds=query, encoder_hidden_states=memory, encoder_attention_mask=mask,
                          object_queries_position_embeddings=query_pos, reference_points=reference,
                          spatial_shapes=shapes, spatial_shapes_list=SHAPES, level_start_index=level_start_index,
                          valid_ratios=valid_ratios)
        output = ours(query, query_pos, reference, memory, SHAPES, valid_ratios, mask, box_heads=heads,
                      output_attentions=True, output_hidden_states=True)
    assert len(output.hidden_states) == LAYERS + 1 and output.hidden_states[0] is query
    assert [tuple(w.shape) for w in output.cross_attentions] == [(BATCH, QUERIES, HEADS, len(SHAPES) * POINTS)] * 3
    torch.testing.assert_close(output.intermediate, expected.intermediate_hidden_states.transpose(0, 1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.intermediate[-1], expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    # transformers' intermediate_reference_points: each layer's refined boxes (or the unchanged references)
    expected_references = expected.intermediate_reference_points.transpose(0, 1)
    if refine:
        torch.testing.assert_close(output.boxes, expected_references, atol=1e-5, rtol=1e-5)
        for later, earlier in zip(output.reference_points[1:], output.boxes[:-1]):
            assert torch.equal(later, earlier)
        assert output.boxes.std(dim=0).mean() > 1e-3               # the layers do move the boxes
    else:
        assert output.boxes is None
        for layer_reference, expected_reference in zip(output.reference_points, expected_references):
            assert torch.equal(layer_reference, expected_reference)


def test_decoder_matches_transformers_rt_detr_v2():
    their_config = RTDetrV2Config(d_model=D_MODEL, decoder_attention_heads=HEADS, decoder_ffn_dim=64,
                                  decoder_n_levels=len(SHAPES), decoder_n_points=POINTS, decoder_layers=LAYERS,
                                  decoder_offset_scale=0.6, **NO_DROPOUT)
    _, our_config = configs()
    theirs = randomize_(RTDetrV2Decoder(their_config)).eval()
    for layer in theirs.layers:
        layer.encoder_attn.n_points_scale.fill_(1.0 / POINTS)       # a buffer (1 / points per level), not a weight
    theirs.bbox_embed = heads = box_heads()
    ours = DetrCustomDeformableDecoder(our_config, len(SHAPES), POINTS, offset_scale=0.6).eval()
    ours.load_state_dict({k: v for k, v in converted(theirs.state_dict()).items()
                          if not k.startswith(("bbox_embed", "query_pos_head")) and "n_points_scale" not in k})
    query, _, _, memory, _, _ = make_inputs(4)
    box_logits = torch.randn(BATCH, QUERIES, 4, generator=torch.Generator().manual_seed(5))
    shapes, level_start_index = spatial_inputs()
    with torch.no_grad():
        expected = theirs(inputs_embeds=query, encoder_hidden_states=memory, reference_points=box_logits,
                          spatial_shapes=shapes, spatial_shapes_list=SHAPES, level_start_index=level_start_index)
        output = ours(query, None, box_logits.sigmoid(), memory, SHAPES, box_heads=heads,
                      query_pos_head=theirs.query_pos_head)
    expected_states = expected.intermediate_hidden_states.transpose(0, 1)
    torch.testing.assert_close(output.intermediate[0], expected_states[0], atol=1e-5, rtol=1e-5)
    # RT-DETRv2 scales box offsets by a stored float32 1 / points, we divide (Deformable DETR's order): ~1e-6 apart
    # after one layer, and each refined box moves the next layer's samples, ~5x more per layer
    torch.testing.assert_close(output.intermediate, expected_states, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(output.boxes, expected.intermediate_reference_points.transpose(0, 1),
                               atol=1e-5, rtol=1e-5)


def test_refinement_stops_gradients_between_layers():
    _, our_config = configs()
    decoder = randomize_(DetrCustomDeformableDecoder(our_config, len(SHAPES), POINTS))
    heads = box_heads()
    query, query_pos, reference, memory, valid_ratios, mask = make_inputs(4)
    output = decoder(query, query_pos, reference, memory, SHAPES, valid_ratios, mask, box_heads=heads)
    output.boxes[-1].sum().backward()
    # earlier heads only moved the references the last layer sampled around, which are detached (their gradient is
    # the zeros the stacked output hands to its other layers)
    for head in heads[:-1]:
        assert all(p.grad is None or not p.grad.any() for p in head.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads[-1].parameters())
    # the layers themselves still learn from the last layer's boxes, through the hidden states
    assert decoder.layers[0].linear1.weight.grad.abs().sum() > 0


def test_inverse_sigmoid_matches_transformers_and_refine_keeps_a_zero_delta():
    x = torch.tensor([-0.1, 0.0, 1e-7, 0.3, 0.5, 0.999999, 1.0, 1.2])
    torch.testing.assert_close(inverse_sigmoid(x), reference_inverse_sigmoid(x))
    boxes = torch.rand(3, 4) * 0.8 + 0.1
    torch.testing.assert_close(refine_boxes(boxes, torch.zeros(3, 4)), boxes)
    points = torch.rand(3, 2) * 0.8 + 0.1
    refined = refine_boxes(points, torch.zeros(3, 4))
    torch.testing.assert_close(refined[:, :2], points)
    assert torch.equal(refined[:, 2:], torch.full((3, 2), 0.5))


def test_bad_inputs_say_what_to_fix():
    _, our_config = configs()
    decoder = DetrCustomDeformableDecoder(our_config, len(SHAPES), POINTS)
    query, query_pos, reference, memory, valid_ratios, mask = make_inputs(4)
    with pytest.raises(ValueError, match="reference_points"):
        decoder(query, query_pos, reference[..., :3], memory, SHAPES)
    with pytest.raises(ValueError, match="query_pos_head"):
        decoder(query, None, reference, memory, SHAPES)
    with pytest.raises(ValueError, match="box_heads"):
        decoder(query, query_pos, reference, memory, SHAPES, box_heads=box_heads()[:2])


def test_gradient_checkpointing_gives_the_same_gradients():
    _, our_config = configs()
    decoder = randomize_(DetrCustomDeformableDecoder(our_config, len(SHAPES), POINTS)).train()
    heads = box_heads()
    query, query_pos, reference, memory, valid_ratios, mask = make_inputs(4)

    def gradients():
        decoder.zero_grad()
        output = decoder(query, query_pos, reference, memory, SHAPES, valid_ratios, mask, box_heads=heads)
        (output.intermediate.square().mean() + output.boxes.sum()).backward()
        return [p.grad.clone() for p in decoder.parameters()]

    calls = []
    decoder.layers[0].cross_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    expected = gradients()
    for layer in decoder.layers:      # what PreTrainedModel.gradient_checkpointing_enable sets on each layer
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    for actual, wanted in zip(gradients(), expected):
        torch.testing.assert_close(actual, wanted)
    assert len(calls) == 3            # once without checkpointing; forward + recompute in backward with it
