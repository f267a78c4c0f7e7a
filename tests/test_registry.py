"""The seam (registry.py): a decoder or a query source defined outside the package plugs in by one `register_*`
line, trains, saves and loads like the built-in ones; heads and the criterion come from their tables too."""
import contextlib
import copy

import pytest
import torch
from torch import nn

from modeling_detr_custom import (DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomLoss, Queries, QuerySource,
                                  register_criterion, register_decoder, register_query_source)
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


@contextlib.contextmanager
def registered(*entries):
    """Registers each (register function, registry table, name, class) for the block, then removes them."""
    try:
        for register, _, name, cls in entries:
            register(name, cls)
        yield
    finally:
        for _, table, name, _ in entries:
            table.pop(name, None)
        registry.publish_names()


@pytest.fixture
def toy_decoder():
    with registered((register_decoder, registry.DECODERS, "toy", ToyDecoder)):
        yield ToyDecoder


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


class ToyAnchorQueries(QuerySource):
    """A query source written outside the package (multi-scale: content queries with reference boxes): learned
    content queries whose reference boxes come from a linear map of the content, the same tables for every query
    group."""

    multi_scale = True

    def __init__(self, config):
        super().__init__()
        self.toy_queries = nn.Embedding(config.num_queries, config.d_model)
        self.toy_box = nn.Linear(config.d_model, 4)
        self.toy_scale = nn.Parameter(torch.ones(()))   # a bare parameter: loading replaces it on the assembly

    def forward(self, memory, memory_mask, spatial_shapes, num_groups):
        content = self.toy_queries.weight.repeat(num_groups, 1)                   # [K * queries, d_model]
        reference = (self.toy_scale * self.toy_box(content)).sigmoid()            # [K * queries, 4]
        batch = memory.shape[0]
        return Queries(content=content[None].expand(batch, -1, -1), reference=reference[None].expand(batch, -1, -1))


@pytest.fixture
def toy_query_source():
    with registered((register_query_source, registry.QUERY_SOURCES, "toy_anchors", ToyAnchorQueries)):
        yield ToyAnchorQueries


def _toy_source_config(**overrides):
    return DetrCustomConfig(**tiny_kwargs(decoder_type="deformable", num_feature_levels=2, classification_loss="focal",
                                          query_source="toy_anchors", **overrides))


def test_a_query_source_registered_from_outside_trains_saves_and_loads(toy_query_source, tmp_path):
    from modeling_detr_custom import configuration_detr_custom as configuration

    assert "toy_anchors" in configuration.QUERY_SOURCES and "toy_anchors" in configuration.MULTI_SCALE_QUERY_SOURCES
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(_toy_source_config()).train()
    source = model.model.query_source
    assert type(source) is ToyAnchorQueries
    # its parameters sit on the assembly under their own names; the source itself holds none
    keys = set(model.state_dict())
    assert {"model.toy_queries.weight", "model.toy_box.weight", "model.toy_scale"} <= keys
    assert not any("query_source" in key for key in keys) and list(source.parameters()) == []
    assert "model.reference_boxes" not in keys and "model.query_embed.weight" not in keys
    toy = [model.model.toy_queries.weight, model.model.toy_box.weight, model.model.toy_scale]
    pixel_values, pixel_mask, labels = padded_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in toy]
    out = model(pixel_values, pixel_mask, labels=labels)
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 10, 3)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in toy)
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, toy))
    assert source.training and not model.eval().model.query_source.training   # the assembly's mode

    model.save_pretrained(tmp_path)
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path).eval()
    assert loaded.config.query_source == "toy_anchors" and type(loaded.model.query_source) is ToyAnchorQueries
    # the source reads the loaded parameters (loading replaces the assembly's), not the ones it was built with
    assert loaded.model.query_source.toy_scale is loaded.model.toy_scale
    torch.testing.assert_close(loaded.model.toy_scale, model.model.toy_scale, rtol=0, atol=0)
    copied = copy.deepcopy(loaded)   # the EMA copy: its source reads the copy's parameters
    assert copied.model.query_source.toy_scale is copied.model.toy_scale
    with torch.no_grad():
        expected, got, got_copy = (m(pixel_values, pixel_mask) for m in (model, loaded, copied))
    for result in (got, got_copy):
        torch.testing.assert_close(result.logits, expected.logits, rtol=0, atol=0)
        torch.testing.assert_close(result.pred_boxes, expected.pred_boxes, rtol=0, atol=0)


def test_query_sources_are_chosen_from_the_config_and_unknown_ones_list_the_registered():
    """The built-in sources by the existing fields (saved configs without `query_source` build what they built), and
    by name; a source the decoder cannot take, a name that disagrees with two_stage or an unknown name is refused."""
    from modeling_detr_custom.query_selection import TwoStageQueries
    from modeling_detr_custom.query_source_learned import LearnedQueries
    from modeling_detr_custom.query_source_learned_boxes import LearnedBoxQueries

    detr = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs()))
    assert type(detr.model.query_source) is LearnedQueries
    deformable = dict(decoder_type="deformable", num_feature_levels=2, classification_loss="focal")
    for overrides, source in ((dict(), LearnedBoxQueries), (dict(two_stage=True), TwoStageQueries),
                              (dict(query_source="learned_boxes"), LearnedBoxQueries),
                              (dict(query_source="two_stage", two_stage=True), TwoStageQueries)):
        model = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs(**deformable, **overrides)))
        assert type(model.model.query_source) is source, overrides
    with pytest.raises(ValueError, match=r"query_source='anchors' is not supported; use one of \('learned', "
                                         r"'learned_boxes', 'two_stage'\).*register_query_source"):
        DetrCustomConfig(query_source="anchors")
    with pytest.raises(ValueError, match="query_source='two_stage' and two_stage=False disagree"):
        DetrCustomConfig(**tiny_kwargs(**deformable, query_source="two_stage"))
    with pytest.raises(ValueError, match="query_source='learned' does not fit decoder_type='deformable'"):
        DetrCustomConfig(**tiny_kwargs(**deformable, query_source="learned"))
    with pytest.raises(ValueError, match="not a subclass of modeling_detr_custom.query_sources.QuerySource"):
        register_query_source("plain", nn.Embedding)
    assert "plain" not in registry.QUERY_SOURCES


def test_a_source_unregistered_after_its_config_was_built_names_the_registered_ones(toy_query_source):
    config = _toy_source_config()
    registry.QUERY_SOURCES.pop("toy_anchors")
    try:
        with pytest.raises(ValueError, match=r"config.query_source='toy_anchors' is not registered; registered: "
                                             r"\('learned', 'learned_boxes', 'two_stage'\).*register_query_source"):
            DetrCustomForObjectDetection(config)
    finally:
        registry.QUERY_SOURCES["toy_anchors"] = ToyAnchorQueries


class DoubledLoss(DetrCustomLoss):
    """A criterion from outside: the set loss, doubled."""

    def forward(self, *args, **kwargs):
        loss, loss_dict = super().forward(*args, **kwargs)
        return 2 * loss, loss_dict


def test_heads_and_criterion_come_from_their_tables():
    """The heads in the decoder's declared layout (shared for DETR's, per layer for the deformable one, or what a
    decoder names in `heads`) and the criterion named by the config, each built through the registry."""
    pixel_values, pixel_mask, labels = padded_batch()
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs()))
    assert isinstance(model.class_embed, nn.Linear) and type(model.criterion) is DetrCustomLoss
    deformable = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs(
        decoder_type="deformable", num_feature_levels=2, classification_loss="focal")))
    assert isinstance(deformable.model.class_embed, nn.ModuleList) and len(deformable.model.bbox_embed) == 2

    class PerLayerToyDecoder(ToyDecoder):
        heads = "per_layer"

    register_decoder("toy_per_layer", PerLayerToyDecoder)
    register_criterion("doubled", DoubledLoss)
    try:
        model = DetrCustomForObjectDetection(DetrCustomConfig(**tiny_kwargs(decoder_type="toy_per_layer",
                                                                            criterion="doubled"))).train()
        assert isinstance(model.class_embed, nn.ModuleList) and len(model.class_embed) == 2
        assert type(model.criterion) is DoubledLoss
        out = model(pixel_values, pixel_mask, labels=labels)
        single = DetrCustomLoss(model.config)(out.logits, out.pred_boxes, labels, out.auxiliary_outputs)[0]
        torch.testing.assert_close(out.loss, 2 * single)
        out.loss.backward()
        assert all(head.weight.grad.abs().sum() > 0 for head in model.class_embed)   # each layer's own head
        with pytest.raises(ValueError, match=r"criterion='nope' is not supported; use one of \('hungarian', "
                                             r"'hybrid', 'doubled'\)"):
            DetrCustomConfig(criterion="nope")
    finally:
        registry.DECODERS.pop("toy_per_layer")
        registry.CRITERIA.pop("doubled")
        registry.publish_names()


def test_part_specific_fields_follow_the_parts_that_read_them_not_their_names():
    """A field only some parts read (their `config_fields`) is accepted for a registered part that declares it and
    refused, naming the parts that read it, for one that does not."""
    from modeling_detr_custom import DetrCustomConfig, registry
    from modeling_detr_custom.decoder_deformable import DetrCustomDeformableDecoder

    class Renamed(DetrCustomDeformableDecoder):
        pass

    class NoPoints(DetrCustomDeformableDecoder):
        config_fields = ()

    with registered((register_decoder, registry.DECODERS, "renamed_deformable", Renamed),
                    (register_decoder, registry.DECODERS, "no_points", NoPoints)):
        config = DetrCustomConfig.from_preset("deformable", decoder_type="renamed_deformable", decoder_n_points=8,
                                              use_pretrained_backbone=False)
        assert config.decoder_n_points == 8
        with pytest.raises(ValueError, match=r"^decoder_n_points=8 has no effect here: only the decoders "
                                             r"\['deformable', 'renamed_deformable'\] read it, and "
                                             r"decoder_type='no_points' does not\..*set decoder_type to one of"):
            DetrCustomConfig.from_preset("deformable", decoder_type="no_points", decoder_n_points=8,
                                         use_pretrained_backbone=False)
    with pytest.raises(ValueError, match=r"decoder_n_points=8 has no effect here: only the decoders \['deformable'\]"):
        DetrCustomConfig(decoder_n_points=8)
