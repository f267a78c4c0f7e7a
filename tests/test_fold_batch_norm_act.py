"""The frozen BatchNorm fold on timm's EfficientNet-family backbones (MobileNetV2: the demo's), whose blocks norm
with `FrozenBatchNormAct2d` (BatchNorm, dropout and activation in one module): every one folds into its convolution,
and the folded body gives the plain body's outputs and gradients. Compared in float64, where the fold is exact: in
fp32, 17 blocks of random weights grow the folded weights' rounding (a trained MobileNetV2's features differ by
~4e-6 of 7, a random one's gradients by 1.5% where ReLU6 gates flip)."""
import torch
from timm.layers.norm_act import FrozenBatchNormAct2d

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.fast_paths import ConvFrozenBatchNorm2d
from modeling_detr_custom.testing_utils import padded_batch, randomize_, tiny_kwargs


def _mobilenet_model():
    config = DetrCustomConfig(**tiny_kwargs(backbone="mobilenetv2_100", freeze_batch_norm=True, dropout=0.0,
                                            attention_dropout=0.0, activation_dropout=0.0))
    model = randomize_(DetrCustomForObjectDetection(config)).double()
    model.model.backbone.fast_path_min_pixels = 0       # the fast paths at test sizes
    return model


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max().clamp(min=1)).item()


def test_mobilenet_v2_batch_norm_folds_with_the_plain_outputs_and_gradients():
    model = _mobilenet_model()
    backbone = model.model.backbone
    norms = sum(isinstance(m, FrozenBatchNormAct2d) for m in backbone.body.modules())
    assert backbone.fold_batch_norm and norms > 0
    folded = backbone.folded_body()
    assert folded is not backbone.body                 # traced and folded, not the unfolded fallback
    assert sum(type(m) is ConvFrozenBatchNorm2d for m in folded.modules()) == norms
    pixel_values, pixel_mask, _ = padded_batch()
    pixel_values = pixel_values.double()
    with torch.no_grad():
        fast = model.eval()(pixel_values, pixel_mask)
        backbone.fold_batch_norm = False
        plain = model(pixel_values, pixel_mask)
        backbone.fold_batch_norm = True
        features = [body(pixel_values) for body in (folded, backbone.body)]
    for got, expected in zip(*features):
        assert _relative(got, expected) <= 1e-10
    assert _relative(fast.logits, plain.logits) <= 1e-10 and _relative(fast.pred_boxes, plain.pred_boxes) <= 1e-10
    # training: the fold shares the parameters, so the gradients are the unfolded body's
    backbone.train()
    gradients = []
    for body in (folded, backbone.body):
        backbone.zero_grad()
        body(pixel_values)[-1].square().mean().backward()
        gradients.append({n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None})
    assert len(gradients[0]) == len(gradients[1]) > 0
    for name, grad in gradients[0].items():
        assert (grad - gradients[1][name]).norm() <= 1e-10 * gradients[1][name].norm(), name
