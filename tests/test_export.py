"""The model as a user gets it (built or loaded, eval mode, nothing switched) exports with torch.export and the dynamo
ONNX exporter, and the exported program gives the eager outputs on other padding patterns, batch sizes and image
sizes than the ones it was exported with: nothing in the forward branches on tensor values while it is traced."""
import pytest
import torch
from torch.export import Dim
from transformers import RTDetrResNetConfig, RTDetrV2Config

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.checkpoint_conversion_rt_detr import convert_rt_detr_config
from modeling_detr_custom.testing_utils import padded_batch, randomize_

SMALL = dict(backbone="resnet18", use_pretrained_backbone=False, d_model=32, encoder_attention_heads=2,
             decoder_attention_heads=2, num_queries=10, num_labels=3, encoder_ffn_dim=64, decoder_ffn_dim=64,
             decoder_layers=2)


def rt_detr_v2_layout() -> DetrCustomConfig:
    """The layout transformers' RT-DETRv2 checkpoints load into (ResNet18-vd, BatchNorm projections, the decoder's
    input projections, the absolute sine), from a small RTDetrV2Config through the conversion `from_pretrained`
    uses."""
    backbone = RTDetrResNetConfig(out_indices=[2, 3, 4], embedding_size=64, layer_type="basic", depths=[2, 2, 2, 2],
                                  hidden_sizes=[64, 128, 256, 512])
    rt_config = RTDetrV2Config(
        backbone_config=backbone, encoder_in_channels=[128, 256, 512], d_model=64, encoder_hidden_dim=64,
        decoder_in_channels=[64, 64, 64], num_queries=12, decoder_layers=3, num_labels=3, hidden_expansion=0.5,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_denoising=0, encoder_attention_heads=4,
        decoder_attention_heads=4)
    return convert_rt_detr_config(rt_config.to_dict())


def layout(name: str) -> DetrCustomConfig:
    return rt_detr_v2_layout() if name == "rtdetr_v2" else DetrCustomConfig.from_preset(name, **SMALL)


def model_of(name: str) -> DetrCustomForObjectDetection:
    torch.manual_seed(0)
    return randomize_(DetrCustomForObjectDetection(layout(name))).eval()


def other_inputs():
    """(pixel_values, pixel_mask) pairs unlike the export example's: other padding, other sizes, no padding, batch 1
    and 3."""
    generator = torch.Generator().manual_seed(5)
    inputs = []
    for batch, height, width, padded in [(2, 128, 128, True), (3, 96, 160, True), (2, 128, 128, False),
                                         (1, 112, 128, False)]:
        pixel_values = torch.randn(batch, 3, height, width, generator=generator)
        pixel_mask = torch.ones(batch, height, width, dtype=torch.long)
        if padded:
            pixel_mask[0, :, width - 48:] = 0           # the export example pads its second image, this the first
            pixel_mask[-1, height // 2:] = 0
        inputs.append((pixel_values, pixel_mask))
    return inputs


def largest_difference(expected, got) -> float:
    """max |difference| of logits and pred_boxes, relative to the logits' scale (at least 1)."""
    scale = max(1.0, expected.logits.abs().max().item())
    return max((expected.logits - got[0]).abs().max().item() / scale,
               (expected.pred_boxes - got[1]).abs().max().item())


DYNAMIC = {"pixel_values": {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},
           "pixel_mask": {0: Dim.AUTO, 1: Dim.AUTO, 2: Dim.AUTO}}


@pytest.mark.parametrize("name", ["detr", "deformable", "rtdetr", "rtdetr_v2"])
def test_torch_export_gives_the_eager_outputs_on_other_padding_and_sizes(name):
    model = model_of(name)
    pixel_values, pixel_mask, _ = padded_batch(height=128, width=128)
    program = torch.export.export(model, (pixel_values,), {"pixel_mask": pixel_mask}, dynamic_shapes=DYNAMIC,
                                  strict=False)
    graph = str(program.graph)
    assert "mkldnn" not in graph and "_convolution_pointwise" not in graph   # plain ops only
    exported = program.module()
    for values, mask in [(pixel_values, pixel_mask), *other_inputs()]:
        with torch.no_grad():
            expected = model(values, pixel_mask=mask)
        got = exported(values, pixel_mask=mask)
        # eager folds BatchNorm into the convolutions (fp32 rounding); the exported program runs them apart
        assert largest_difference(expected, (got.logits, got.pred_boxes)) < 1e-3, (name, tuple(values.shape))
    # not vacuous: the padding changes the outputs, so a graph that kept one padding pattern would fail above
    values, mask = other_inputs()[0]
    with torch.no_grad():
        unpadded = model(values, pixel_mask=torch.ones_like(mask))
        padded = model(values, pixel_mask=mask)
    assert (unpadded.logits - padded.logits).abs().max() > 1e-2


def test_a_loaded_model_exports_and_eager_checks_stay(tmp_path):
    model_of("rtdetr").save_pretrained(tmp_path)
    model = DetrCustomForObjectDetection.from_pretrained(tmp_path).eval()
    pixel_values, pixel_mask, _ = padded_batch(height=128, width=128)
    with torch.no_grad():
        model(pixel_values, pixel_mask)                # eager first: the caches fill, export must not reuse them
    exported = torch.export.export(model, (pixel_values,), {"pixel_mask": pixel_mask}, strict=False).module()
    values, mask = other_inputs()[0]
    with torch.no_grad():
        expected = model(values, pixel_mask=mask)
    got = exported(values, pixel_mask=mask)
    assert largest_difference(expected, (got.logits, got.pred_boxes)) < 1e-3
    bad = pixel_values.clone()
    bad[1, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"images \[1\].*NaN"):      # eager mode keeps its value checks
        model(bad, pixel_mask)


def test_onnx_export_runs_in_onnxruntime_with_the_eager_outputs(tmp_path):
    """The RT-DETRv2 layout, the one with every kind of part (the DETR path's parts are a subset; ~1 min)."""
    name = "rtdetr_v2"
    import onnx          # the export extra, which make test installs: a missing package fails the test
    import onnxruntime
    model = model_of(name)
    pixel_values, pixel_mask, _ = padded_batch(height=128, width=128)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (pixel_values,), path, kwargs={"pixel_mask": pixel_mask}, dynamo=True,
                      input_names=["pixel_values", "pixel_mask"], dynamic_shapes=DYNAMIC)
    operators = {node.domain or "ai.onnx" for node in onnx.load(path).graph.node}
    assert operators == {"ai.onnx"}                   # standard operators only: no oneDNN or other custom domain
    session = onnxruntime.InferenceSession(path)
    for values, mask in other_inputs():
        with torch.no_grad():
            expected = model(values, pixel_mask=mask)
        logits, boxes = session.run(None, {"pixel_values": values.numpy(), "pixel_mask": mask.numpy()})[:2]
        assert largest_difference(expected, (torch.from_numpy(logits), torch.from_numpy(boxes))) < 1e-3, name
