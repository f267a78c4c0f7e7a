"""Multi-scale deformable attention: parity with transformers' Deformable DETR and RT-DETRv2 (pytorch paths) with
copied weights, an independent bilinear reference, padding masks, bf16 autocast, gradients and the init."""
import math

import pytest
import torch
from transformers import DeformableDetrConfig, RTDetrV2Config
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrMultiscaleDeformableAttention, DeformableDetrPreTrainedModel)
from transformers.models.rt_detr_v2.modeling_rt_detr_v2 import (
    RTDetrV2MultiscaleDeformableAttention, multi_scale_deformable_attention_v2)

from modeling_detr_custom.attention_deformable import DetrCustomDeformableAttention, multi_scale_deformable_attention
from modeling_detr_custom.testing_utils import randomize_

D_MODEL, HEADS, POINTS = 32, 4, 3
SHAPES = [(6, 7), (3, 4), (2, 1)]          # uneven levels, one of width 1
BATCH, QUERIES = 2, 5


def make_inputs(reference_dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sequence = sum(h * w for h, w in SHAPES)
    query = torch.randn(BATCH, QUERIES, D_MODEL, generator=generator)
    value = torch.randn(BATCH, sequence, D_MODEL, generator=generator)
    reference = torch.rand(BATCH, QUERIES, len(SHAPES), reference_dim, generator=generator)
    if reference_dim == 4:
        reference[..., 2:] = reference[..., 2:] * 0.5 + 0.05     # box sizes in (0.05, 0.55)
    # image 1 padded: its right columns and bottom rows of every level are padding
    mask = torch.ones(BATCH, sequence, dtype=torch.bool)
    start = 0
    for height, width in SHAPES:
        level = torch.ones(height, width, dtype=torch.bool)
        level[height // 2 + 1:, :] = False
        level[:, width // 2 + 1:] = False
        mask[1, start:start + height * width] = level.flatten()
        start += height * width
    return query, reference, value, mask


def spatial_inputs():
    shapes = torch.tensor(SHAPES)
    level_start_index = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    return shapes, level_start_index


def transformers_and_ours():
    config = DeformableDetrConfig(d_model=D_MODEL, num_feature_levels=len(SHAPES))
    theirs = randomize_(DeformableDetrMultiscaleDeformableAttention(config, num_heads=HEADS, n_points=POINTS)).eval()
    ours = DetrCustomDeformableAttention(D_MODEL, HEADS, len(SHAPES), POINTS).eval()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_matches_transformers_deformable_detr(reference_dim):
    theirs, ours = transformers_and_ours()
    query, reference, value, mask = make_inputs(reference_dim)
    shapes, level_start_index = spatial_inputs()
    with torch.no_grad():
        expected, expected_weights = theirs(query, attention_mask=mask, encoder_hidden_states=value,
                                            reference_points=reference, spatial_shapes=shapes,
                                            spatial_shapes_list=SHAPES, level_start_index=level_start_index)
        output, weights = ours(query, reference, value, shapes, level_start_index, value_mask=mask)
        output_from_list, _ = ours(query, reference, value, SHAPES, value_mask=mask.long())
    assert output.shape == (BATCH, QUERIES, D_MODEL)
    assert expected.std() > 0.1                                        # not a vacuous comparison
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights.flatten(-2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output_from_list, output, atol=0, rtol=0)


def test_matches_transformers_rt_detr_v2_boxes():
    config = RTDetrV2Config(d_model=D_MODEL, decoder_attention_heads=HEADS, decoder_n_points=POINTS,
                            decoder_n_levels=len(SHAPES), decoder_offset_scale=0.7)
    theirs = randomize_(RTDetrV2MultiscaleDeformableAttention(config)).eval()
    theirs.n_points_scale.fill_(1.0 / POINTS)               # a buffer (1 / points per level), not a weight
    ours = DetrCustomDeformableAttention(D_MODEL, HEADS, len(SHAPES), POINTS, offset_scale=0.7).eval()
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if k != "n_points_scale"})
    query, reference, value, mask = make_inputs(4, seed=1)
    shapes, level_start_index = spatial_inputs()
    with torch.no_grad():
        # RT-DETRv2's box references are one per query, shared by the levels: [batch, queries, 1, 4]
        expected, _ = theirs(query, attention_mask=mask, encoder_hidden_states=value,
                             reference_points=reference[:, :, :1], spatial_shapes=shapes, spatial_shapes_list=SHAPES,
                             level_start_index=level_start_index)
        output, _ = ours(query, reference[:, :, :1].expand(-1, -1, len(SHAPES), -1), value, shapes, value_mask=mask)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_points_per_level_match_rt_detr_v2_sampling():
    num_points = [3, 2, 1]
    generator = torch.Generator().manual_seed(2)
    value = torch.randn(BATCH, sum(h * w for h, w in SHAPES), HEADS, 8, generator=generator)
    locations = torch.rand(BATCH, QUERIES, HEADS, sum(num_points), 2, generator=generator) * 1.2 - 0.1
    weights = torch.rand(BATCH, QUERIES, HEADS, sum(num_points), generator=generator)
    expected = multi_scale_deformable_attention_v2(value, SHAPES, locations, weights, num_points)
    output = multi_scale_deformable_attention(value, SHAPES, locations, weights, num_points)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def bilinear_reference(value, shapes, locations, weights, num_points):
    """Written out from the definition: pixel centres at (i + 0.5) / size, four neighbours, zero outside."""
    batch, _, heads, head_dim = value.shape
    output = torch.zeros(batch, locations.shape[1], heads, head_dim, dtype=value.dtype)
    start, point = 0, 0
    for (height, width), points in zip(shapes, num_points):
        level = value[:, start:start + height * width].unflatten(1, (height, width))  # [batch, h, w, heads, dim]
        for _ in range(points):
            x = locations[:, :, :, point, 0] * width - 0.5                             # [batch, queries, heads]
            y = locations[:, :, :, point, 1] * height - 0.5
            x0, y0 = x.floor(), y.floor()
            for dx in (0, 1):
                for dy in (0, 1):
                    xi, yi = x0 + dx, y0 + dy
                    corner_weight = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                    b = torch.arange(batch)[:, None, None].expand_as(x)
                    h = torch.arange(heads)[None, None, :].expand_as(x)
                    sampled = level[b, yi.clamp(0, height - 1).long(), xi.clamp(0, width - 1).long(), h]
                    scale = (corner_weight * inside * weights[:, :, :, point])[..., None]
                    output += sampled * scale
            point += 1
        start += height * width
    return output.flatten(2)


def test_sampling_matches_bilinear_definition():
    num_points = [2, 3, 1]
    generator = torch.Generator().manual_seed(3)
    value = torch.randn(BATCH, sum(h * w for h, w in SHAPES), HEADS, 8, generator=generator, dtype=torch.float64)
    # some locations outside [0, 1]: they read zeros (partly, near the border)
    locations = torch.rand(BATCH, QUERIES, HEADS, sum(num_points), 2, generator=generator, dtype=torch.float64)
    locations = locations * 1.4 - 0.2
    weights = torch.rand(BATCH, QUERIES, HEADS, sum(num_points), generator=generator, dtype=torch.float64)
    output = multi_scale_deformable_attention(value, SHAPES, locations, weights, num_points)
    torch.testing.assert_close(output, bilinear_reference(value, SHAPES, locations, weights, num_points))


def test_padded_positions_are_not_read():
    _, ours = transformers_and_ours()
    query, reference, value, mask = make_inputs(2)
    changed = value.clone()
    changed[~mask] = 100.0
    with torch.no_grad():
        output, _ = ours(query, reference, value, SHAPES, value_mask=mask)
        output_changed, _ = ours(query, reference, changed, SHAPES, value_mask=mask)
        unmasked, _ = ours(query, reference, changed, SHAPES)
    torch.testing.assert_close(output_changed, output, atol=0, rtol=0)
    assert (unmasked[1] - output[1]).abs().max() > 1.0              # the padding would be read without the mask


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_bf16_autocast_is_close_to_fp32(reference_dim):
    _, ours = transformers_and_ours()
    query, reference, value, mask = make_inputs(reference_dim)
    with torch.no_grad():
        expected, _ = ours(query, reference, value, SHAPES, value_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, weights = ours(query, reference, value, SHAPES, value_mask=mask)
        bf16_model = ours.to(torch.bfloat16)
        pure, _ = bf16_model(query.bfloat16(), reference, value.bfloat16(), SHAPES, value_mask=mask)
    assert output.dtype == torch.bfloat16 and pure.dtype == torch.bfloat16
    scale = expected.abs().max()
    assert (output.float() - expected).abs().max() < 0.02 * scale
    assert (pure.float() - expected).abs().max() < 0.02 * scale


def test_gradcheck_sampling_float64():
    num_points = [2, 1]
    shapes = [(3, 4), (2, 2)]
    generator = torch.Generator().manual_seed(4)
    value = torch.randn(1, 16, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    # away from pixel centres, where bilinear interpolation has kinks
    locations = (torch.rand(1, 2, 2, 3, 2, generator=generator, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    weights = torch.rand(1, 2, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_attention(v, shapes, loc, w, num_points),
        (value, locations, weights))


@pytest.mark.parametrize("reference_dim", [2, 4])
def test_every_parameter_and_input_gets_a_gradient(reference_dim):
    _, ours = transformers_and_ours()
    query, reference, value, mask = make_inputs(reference_dim)
    query.requires_grad_()
    value.requires_grad_()
    reference.requires_grad_()
    output, _ = ours(query, reference, value, SHAPES, value_mask=mask)
    output.square().sum().backward()
    for name, parameter in ours.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for tensor in (query, value, reference):
        assert tensor.grad.abs().sum() > 0


def test_init_equals_transformers():
    config = DeformableDetrConfig(d_model=D_MODEL, num_feature_levels=len(SHAPES))
    theirs = DeformableDetrMultiscaleDeformableAttention(config, num_heads=HEADS, n_points=POINTS)
    DeformableDetrPreTrainedModel(config)._init_weights(theirs)
    ours = DetrCustomDeformableAttention(D_MODEL, HEADS, len(SHAPES), POINTS)
    for name in ("sampling_offsets.weight", "sampling_offsets.bias", "attention_weights.weight",
                 "attention_weights.bias", "value_proj.bias", "output_proj.bias"):
        torch.testing.assert_close(ours.get_parameter(name), theirs.get_parameter(name), atol=1e-6, rtol=0)
    for name in ("value_proj.weight", "output_proj.weight"):   # xavier-uniform: random, within the same bound
        bound = math.sqrt(6.0 / (2 * D_MODEL))
        assert ours.get_parameter(name).abs().max() <= bound
        assert ours.get_parameter(name).std() > 0.4 * bound
    # head 0 points along +x, k-th point of a level at k pixels
    bias = ours.sampling_offsets.bias.view(HEADS, len(SHAPES) * POINTS, 2)
    assert bias[0, :POINTS].tolist() == [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]


def test_init_with_points_per_level_restarts_the_steps_at_each_level():
    ours = DetrCustomDeformableAttention(D_MODEL, 2, 3, num_points=[3, 2, 1])
    bias = ours.sampling_offsets.bias.view(2, 6, 2)
    assert bias[0, :, 0].tolist() == [1.0, 2.0, 3.0, 1.0, 2.0, 1.0]


def test_bad_inputs_say_what_to_fix():
    _, ours = transformers_and_ours()
    query, reference, value, mask = make_inputs(2)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ours(query, reference, value[:, :-1], SHAPES)
    with pytest.raises(ValueError, match="levels"):
        ours(query, reference, value, SHAPES[:2])
    with pytest.raises(ValueError, match="reference_points"):
        ours(query, reference[..., :1], value, SHAPES)
    with pytest.raises(ValueError, match="level_start_index"):
        ours(query, reference, value, SHAPES, level_start_index=[0, 40, 54])
    with pytest.raises(ValueError, match="value_mask"):
        ours(query, reference, value, SHAPES, value_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="divisible"):
        DetrCustomDeformableAttention(30, 4, 3)
    with pytest.raises(ValueError, match="num_points"):
        DetrCustomDeformableAttention(32, 4, 3, num_points=[4, 4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_in_fp32_and_runs_bf16_autocast():
    _, ours = transformers_and_ours()
    inputs = make_inputs(4)
    query, reference, value, mask = inputs
    with torch.no_grad():
        expected, _ = ours(query, reference, value, SHAPES, value_mask=mask)
        ours = ours.cuda()
        cuda_inputs = [tensor.cuda() for tensor in inputs]
        output, _ = ours(*cuda_inputs[:3], SHAPES, value_mask=cuda_inputs[3])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16, _ = ours(*cuda_inputs[:3], SHAPES, value_mask=cuda_inputs[3])
    torch.testing.assert_close(output.cpu(), expected, atol=1e-5, rtol=1e-5)
    assert (bf16.float().cpu() - expected).abs().max() < 0.02 * expected.abs().max()
