"""The seam (registry.py): a decoder defined outside the package plugs in by one `register_decoder` line, trains,
saves and loads like the built-in ones."""
import pytest
import torch
from torch import nn

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, register_decoder
from modeling_detr_custom import registry
from modeling_detr_custom.testing_utils import padded_batch, tiny_kwargs


class ToyDecoder(nn.Module):
    """The single-scale decoder interface (decoder_detr.py) at its smallest: every query reads the memory by one
    dot-product attention, then each layer is a residual linear block; returns every layer's normed state."""

    multi_scale = False

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(config.d_model, config.d_model) for _ in range(config.decoder_layers))
        self.norm = nn.LayerNorm(config.d_model)

    def forward(self, query_pos, memory, memory_pos, memory_mask, output_attentions, output_hidden_states,
                self_attn_mask=None):
        scores = query_pos @ (memory + memory_pos).transpose(1, 2) / memory.shape[-1] ** 0.5   # [batch, q, h * w]
        if memory_mask is not None:
            scores = scores.masked_fill(~memory_mask[:, None], float("-inf"))
        hidden, intermediate = query_pos + scores.softmax(-1) @ memory, []
        for layer in self.layers:
            hidden = hidden + torch.relu(layer(hidden))
            intermediate.append(self.norm(hidden))
        return torch.stack(intermediate), None, None, None


@pytest.fixture
def toy_decoder():
    register_decoder("toy", ToyDecoder)
    yield ToyDecoder
    registry.DECODERS.pop("toy")
    registry.publish_names()


def test_a_decoder_registered_from_outside_trains_saves_and_loads(toy_decoder, tmp_path):
    from modeling_detr_custom import configuration_detr_custom as configuration

    assert "toy" in configuration.DECODER_TYPES and "toy" not in configuration.MULTI_SCALE_DECODER_TYPES
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs(decoder_type="toy"))).train()
    assert type(model.model.decoder) is ToyDecoder
    pixel_values, pixel_mask, labels = padded_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.model.decoder.parameters()]
    out = model(pixel_values, pixel_mask, labels=labels)
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 10, 4)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.decoder.parameters())
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.model.decoder.parameters()))

    model.eval().save_pretrained(tmp_path)
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path).eval()
    assert loaded.config.decoder_type == "toy" and type(loaded.model.decoder) is ToyDecoder
    with torch.no_grad():
        expected, got = model(pixel_values, pixel_mask), loaded(pixel_values, pixel_mask)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, rtol=0, atol=0)


def test_unknown_and_malformed_parts_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="decoder_type='toy' is not supported"):
        DetrCustomConfig(**tiny_kwargs(decoder_type="toy"))
    with pytest.raises(ValueError, match="no boolean class attribute `multi_scale`"):
        register_decoder("broken", nn.Linear)
    assert "broken" not in registry.DECODERS


def test_the_config_checks_a_registered_multi_scale_decoder_by_its_kind_not_its_name():
    """The config's rules read the registry's names: a registered multi-scale decoder takes feature levels and query
    selection as the deformable one does; an unknown name lists the registered ones."""
    from modeling_detr_custom import DetrCustomConfig, registry
    from modeling_detr_custom.decoder_deformable import DetrCustomDeformableDecoder

    class Renamed(DetrCustomDeformableDecoder):
        pass

    registry.register_decoder("renamed_deformable", Renamed)
    try:
        config = DetrCustomConfig.from_preset("deformable", decoder_type="renamed_deformable", two_stage=True,
                                              num_labels=3, use_pretrained_backbone=False)
        assert config.num_feature_levels == 4
        with pytest.raises(ValueError, match=r"decoder_type='nope'.*renamed_deformable.*register_decoder"):
            DetrCustomConfig(decoder_type="nope")
    finally:
        registry.DECODERS.pop("renamed_deformable")
        registry.publish_names()
    with pytest.raises(ValueError, match="decoder_type='renamed_deformable' is not supported"):
        DetrCustomConfig(decoder_type="renamed_deformable")
