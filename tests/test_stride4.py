"""`finest_level_stride=4`: the backbone's stride-4 stage becomes the finest level of the multi-scale models (timm
MobileNetV2 and ResNet-18), with each encoder, query selection over every level, training, save / load, the fast
paths and torch.export; the default (8) keeps the levels it had, and bad values are refused naming the field."""
import pytest
import torch
from torch.export import Dim

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.fast_paths import ConvFrozenBatchNorm2d
from modeling_detr_custom.testing_utils import padded_batch, randomize_, train_on_a_fixed_batch

SMALL = dict(use_pretrained_backbone=False, d_model=32, encoder_attention_heads=2, decoder_attention_heads=2,
             num_queries=10, num_labels=3, encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_layers=2, dropout=0.0,
             attention_dropout=0.0, activation_dropout=0.0)
# encoder_type per preset: "detr" (AIFI on the coarsest level), "hybrid" (RT-DETR's, fusing all four levels) and
# Deformable DETR's encoder over every level
LAYOUTS = {"deformable": dict(preset="deformable"), "rtdetr": dict(preset="rtdetr"),
           "deformable_encoder": dict(preset="deformable", encoder_type="deformable")}


def config_of(layout: str = "deformable", backbone: str = "resnet18", **overrides) -> DetrCustomConfig:
    values = dict(LAYOUTS[layout])
    preset = values.pop("preset")
    return DetrCustomConfig.from_preset(preset, backbone=backbone, **SMALL, **values,
                                        **{"finest_level_stride": 4, "num_feature_levels": 4, **overrides})


def model_of(layout: str = "deformable", backbone: str = "resnet18", **overrides) -> DetrCustomForObjectDetection:
    torch.manual_seed(0)
    return DetrCustomForObjectDetection(config_of(layout, backbone, **overrides))


@pytest.mark.parametrize("backbone", ["mobilenetv2_100", "resnet18"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_levels_are_strides_4_8_16_32_with_every_encoder(backbone, layout):
    model = model_of(layout, backbone).eval()
    pixel_values, pixel_mask, _ = padded_batch(height=160, width=128)
    with torch.no_grad():
        output = model.model(pixel_values, pixel_mask)
    assert [tuple(shape) for shape in output.spatial_shapes] == [(40, 32), (20, 16), (10, 8), (5, 4)]
    reductions = model.model.backbone.body.feature_info.reduction()
    assert [reductions[i] for i in model.model.backbone.level_indices] == [4, 8, 16, 32]
    assert len(model.model.input_proj.extra_levels) == 0
    # every level is read: the memory holds all their positions
    assert output.encoder_last_hidden_state.shape[1] == 40 * 32 + 20 * 16 + 10 * 8 + 5 * 4
    with torch.no_grad():
        detections = model(pixel_values, pixel_mask)
    assert detections.logits.shape[:2] == (2, 10) and torch.isfinite(detections.pred_boxes).all()


@pytest.mark.parametrize("backbone", ["mobilenetv2_100", "resnet18"])
def test_five_levels_add_a_stride_64_level_and_the_default_keeps_stride_8(backbone):
    five = model_of(backbone=backbone, num_feature_levels=5).eval()
    default = model_of(backbone=backbone, finest_level_stride=8).eval()
    assert default.config.finest_level_stride == DetrCustomConfig().finest_level_stride == 8
    pixel_values, pixel_mask, _ = padded_batch(height=128, width=128)
    with torch.no_grad():
        shapes = [[tuple(shape) for shape in model.model(pixel_values, pixel_mask).spatial_shapes]
                  for model in (five, default)]
    assert shapes[0] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert shapes[1] == [(16, 16), (8, 8), (4, 4), (2, 2)]      # strides 8, 16, 32 and an extra 64, as before


def test_query_selection_proposes_on_the_stride_4_level():
    """two_stage: every position of every level proposes a box; small objects' queries come from the finest level."""
    model = model_of("rtdetr").eval()
    pixel_values, pixel_mask, _ = padded_batch(height=128, width=128)
    with torch.no_grad():
        output = model.model(pixel_values, pixel_mask)
    from modeling_detr_custom.query_selection import encoder_proposals

    memory_mask = torch.cat([mask.flatten(1) for mask in _level_masks(pixel_mask, output.spatial_shapes)], 1)
    proposals, valid = encoder_proposals(memory_mask, output.spatial_shapes)
    assert proposals.shape[1] == 32 * 32 + 16 * 16 + 8 * 8 + 4 * 4
    finest = valid[:, :32 * 32]
    assert finest[0].sum() > 0.8 * 32 * 32          # the stride-4 level's positions are candidates (not padding)
    assert output.enc_logits.shape == (2, 10, 3)


def _level_masks(pixel_mask, shapes):
    from modeling_detr_custom.backbone import downsample_mask

    return [downsample_mask(pixel_mask, tuple(shape)) for shape in shapes]


@pytest.mark.parametrize("layout", ["deformable", "rtdetr"])
def test_one_step_reaches_every_level(layout):
    """Every level's projection, and with the hybrid encoder its fusion blocks, get a gradient."""
    model = model_of(layout, "mobilenetv2_100", two_stage=True, classification_loss="varifocal").train()
    pixel_values, pixel_mask, labels = padded_batch(height=96, width=96)
    model(pixel_values, pixel_mask, labels=labels).loss.backward()
    parts = list(model.model.input_proj.levels)
    if layout == "rtdetr":
        parts += [*model.model.encoder.fusion.fpn_blocks, *model.model.encoder.fusion.pan_blocks]
    for part in parts:
        gradients = [p.grad for p in part.parameters() if p.requires_grad]
        assert gradients and all(g is not None and g.isfinite().all() for g in gradients)
        assert sum(g.abs().sum() for g in gradients) > 0


def test_a_stride_4_model_learns_a_fixed_batch():
    """finetune_small's pieces (query selection, varifocal loss): 50 steps on a fixed batch (the backbone frozen, as
    the variants' own tests) cut the loss."""
    model = model_of("deformable", "mobilenetv2_100", two_stage=True, classification_loss="varifocal")
    losses = train_on_a_fixed_batch(model)
    assert losses[-1] < 0.6 * losses[0], losses[::10]     # 0.47x measured


def test_save_and_load_give_the_same_outputs(tmp_path):
    model = randomize_(model_of("rtdetr")).eval()
    model.save_pretrained(tmp_path)
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path).eval()
    assert loaded.config.finest_level_stride == 4
    pixel_values, pixel_mask, _ = padded_batch(height=128, width=128)
    with torch.no_grad():
        expected, got = model(pixel_values, pixel_mask), loaded(pixel_values, pixel_mask)
    assert torch.equal(expected.logits, got.logits) and torch.equal(expected.pred_boxes, got.pred_boxes)


def test_folded_batch_norm_gives_the_plain_outputs():
    """The CPU speed-up pass (`fast_paths.py`) folds every frozen BatchNorm of the backbone, the stride-4 stage's
    included, and gives the plain outputs."""
    model = randomize_(model_of("rtdetr")).eval()
    backbone = model.model.backbone
    backbone.fast_path_min_pixels = 0       # the fast paths at test sizes
    pixel_values, pixel_mask, _ = padded_batch(height=128, width=128)
    with torch.no_grad():
        fast = model(pixel_values, pixel_mask)
        backbone.fold_batch_norm = False
        plain = model(pixel_values, pixel_mask)
    assert type(backbone).__name__ == "FastMultiScaleBackbone"
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) or "FrozenBatchNorm" in type(m).__name__
                for m in backbone.body.modules())
    assert sum(isinstance(m, ConvFrozenBatchNorm2d) for m in backbone.folded_body().modules()) == norms == 20
    assert (fast.logits - plain.logits).abs().max() <= 1e-3 * max(1.0, plain.logits.abs().max().item())
    assert (fast.pred_boxes - plain.pred_boxes).abs().max() <= 1e-3


def test_torch_export_gives_the_eager_outputs_on_another_size_and_padding():
    model = randomize_(model_of("rtdetr")).eval()
    pixel_values, pixel_mask, _ = padded_batch(height=128, width=128)
    dynamic = {"pixel_values": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},
               "pixel_mask": {0: Dim.AUTO, 1: Dim.AUTO, 2: Dim.AUTO}}
    exported = torch.export.export(model, (pixel_values,), {"pixel_mask": pixel_mask}, dynamic_shapes=dynamic,
                                   strict=False).module()
    generator = torch.Generator().manual_seed(5)
    values = torch.randn(3, 3, 96, 160, generator=generator)
    mask = torch.ones(3, 96, 160, dtype=torch.long)
    mask[0, :, 112:] = 0
    for inputs in [(pixel_values, pixel_mask), (values, mask)]:
        with torch.no_grad():
            expected = model(inputs[0], pixel_mask=inputs[1])
        got = exported(inputs[0], pixel_mask=inputs[1])
        scale = max(1.0, expected.logits.abs().max().item())
        assert (expected.logits - got.logits).abs().max() / scale < 1e-3
        assert (expected.pred_boxes - got.pred_boxes).abs().max() < 1e-3


@pytest.mark.parametrize("values, named", [
    (dict(preset="deformable", finest_level_stride=2), "finest_level_stride=2"),
    (dict(preset="deformable", finest_level_stride=16), "finest_level_stride=16"),
    (dict(preset="detr", finest_level_stride=4), "decoder_type='detr'"),
])
def test_bad_values_are_refused_naming_the_field(values, named):
    values = dict(values)
    preset = values.pop("preset")
    with pytest.raises(ValueError, match="finest_level_stride") as error:
        DetrCustomConfig.from_preset(preset, backbone="resnet18", use_pretrained_backbone=False, **values)
    assert named in str(error.value)


def test_too_few_levels_for_the_stride_4_stage_are_refused_when_built():
    """resnet18 has stages at strides 4, 8, 16, 32: three levels would read 8, 16, 32 and ignore the setting."""
    with pytest.raises(ValueError, match=r"finest_level_stride=4 with num_feature_levels=3.*\[8, 16, 32\].*"
                                         r"num_feature_levels >= 4"):
        model_of(num_feature_levels=3)
