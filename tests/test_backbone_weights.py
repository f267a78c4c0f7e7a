"""Local pretrained backbone weights (`backbone_weights`): torchvision's files load into timm's models with
torchvision's own outputs, the real ImageNet MobileNetV2 file (`make weights`) recognizes a photo through our
backbone, bad files give errors that say what is wrong, and a saved folder never reads the file again."""
import pathlib

import matplotlib.cbook
import PIL.Image
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torchvision import transforms
from torchvision.models._utils import IntermediateLayerGetter

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection
from modeling_detr_custom.backbone import DetrCustomBackbone
from modeling_detr_custom.backbone_weights import load_backbone_weights
from modeling_detr_custom.testing_utils import padded_batch, randomize_, tiny_kwargs

MOBILENET_V2 = pathlib.Path(__file__).parents[1] / ".weights" / "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
# the only skip: `make test` runs `make weights` first, so under `make test` these tests run
needs_mobilenet_v2 = pytest.mark.skipif(
    not MOBILENET_V2.is_file(), reason=f"{MOBILENET_V2} is absent: run `make weights` (make test does)")
# torchvision's ImageNet evaluation transform
IMAGENET_EVAL = transforms.Compose([
    transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
    transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


def _randomized(model):
    """Random weights and BatchNorm statistics at sane scales (defaults leave the statistics at 0 / 1)."""
    return randomize_(model).eval()


def _assert_close_to_scale(found, expected, tolerance=1e-5):
    """Float32 noise grows with the activations (|features| reaches hundreds with random weights): compare to scale."""
    assert found.shape == expected.shape
    assert (found - expected).abs().max() <= tolerance * expected.abs().max()


def _save(state_dict, path):
    if path.suffix == ".safetensors":
        save_file({key: value.contiguous() for key, value in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return path


@pytest.fixture
def resnet18_file(tmp_path):
    reference = _randomized(torchvision.models.resnet18())
    return reference, _save(reference.state_dict(), tmp_path / "resnet18.pth")


def test_torchvision_mobilenet_v2_keys_map_onto_timm_with_torchvision_outputs(tmp_path):
    reference = _randomized(torchvision.models.mobilenet_v2())
    path = _save(reference.state_dict(), tmp_path / "mobilenet_v2.pth")
    model = timm.create_model("mobilenetv2_100").eval()
    load_backbone_weights(model, path)                   # the full model: classifier included, nothing ignored
    images = torch.randn(2, 3, 160, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_resnet18_file_gives_torchvision_features(tmp_path, suffix, monkeypatch):
    reference = _randomized(torchvision.models.resnet18())
    path = _save(reference.state_dict(), tmp_path / f"resnet18{suffix}")
    pretrained_asked = []
    create_model = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *args, **kwargs: pretrained_asked.append(
        kwargs.get("pretrained")) or create_model(*args, **kwargs))
    backbone = DetrCustomBackbone(DetrCustomConfig(backbone="resnet18", use_pretrained_backbone=True,
                                                   backbone_weights=str(path))).eval()
    assert True not in pretrained_asked          # the local file replaces timm's download: the Hub is never asked
    for name, tensor in backbone.body.state_dict().items():   # frozen BatchNorm keeps weight, bias and statistics
        torch.testing.assert_close(tensor, reference.state_dict()[name], rtol=0, atol=0)
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        features, _ = backbone(pixel_values, pixel_mask)
        expected = IntermediateLayerGetter(reference, {"layer4": "out"})(pixel_values)["out"]
    _assert_close_to_scale(features, expected)


@needs_mobilenet_v2
def test_mobilenet_v2_file_is_torchvision_imagenet_file():
    from modeling_detr_custom.backbone_weights import file_sha256

    assert file_sha256(MOBILENET_V2) == MOBILENET_V2_SHA256   # the name's suffix is its hash prefix, torchvision's
    assert set(torch.load(MOBILENET_V2, weights_only=True)) == set(torchvision.models.mobilenet_v2().state_dict())


@pytest.fixture(scope="module")
def imagenet_mobilenet_v2():
    model = timm.create_model("mobilenetv2_100").eval()
    load_backbone_weights(model, MOBILENET_V2, sha256=MOBILENET_V2_SHA256)
    return model


@needs_mobilenet_v2
def test_imagenet_mobilenet_v2_recognizes_a_photo_as_torchvision(imagenet_mobilenet_v2):
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(MOBILENET_V2, weights_only=True))
    # Grace Hopper in uniform (matplotlib's sample photo); scikit-image's chelsea / coffee / motorcycle_left give
    # Egyptian cat 0.72 / espresso 0.99 / moped 0.59 the same way (checked once; scikit-image is not a dependency)
    photo = PIL.Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    image = IMAGENET_EVAL(photo)[None]                      # [1, 3, 224, 224]
    with torch.no_grad():
        logits = imagenet_mobilenet_v2(image)               # [1, 1000]
        torch.testing.assert_close(logits, reference.eval()(image), atol=1e-5, rtol=1e-5)
    categories = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    top3 = [categories[i] for i in logits[0].topk(3).indices]
    assert top3[0] == "bow tie" and "military uniform" in top3, top3
    assert logits.softmax(-1).max() > 0.4


@needs_mobilenet_v2
def test_detr_backbone_features_are_the_pretrained_models_last_stage(imagenet_mobilenet_v2):
    config = DetrCustomConfig(backbone="mobilenetv2_100", backbone_weights=str(MOBILENET_V2),
                              backbone_weights_sha256=MOBILENET_V2_SHA256)
    backbone = DetrCustomBackbone(config).eval()
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        features, _ = backbone(pixel_values, pixel_mask)            # [2, 320, 5, 4]
        expected = imagenet_mobilenet_v2.forward_intermediates(pixel_values, indices=[4], intermediates_only=True)
    torch.testing.assert_close(features, expected[-1], atol=1e-5, rtol=1e-5)
    # the stem and the first stride-4 stage are frozen, the rest trains (not the whole EfficientNetFeatures body)
    trainable_stages = {".".join(name.split(".")[:2]) for name, parameter in backbone.body.named_parameters()
                        if parameter.requires_grad}
    assert trainable_stages == {f"blocks.{stage}" for stage in range(2, 7)}
    assert not backbone.body.conv_stem.weight.requires_grad


def test_wrong_sha256_names_the_file_and_both_hashes(resnet18_file):
    _, path = resnet18_file
    from modeling_detr_custom.backbone_weights import file_sha256

    config = DetrCustomConfig(backbone="resnet18", backbone_weights=str(path), backbone_weights_sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256") as error:
        DetrCustomBackbone(config)
    assert str(path) in str(error.value) and "0" * 64 in str(error.value) and file_sha256(path) in str(error.value)
    config.backbone_weights_sha256 = "b0353104"
    with pytest.raises(ValueError, match="64 hex digits"):
        DetrCustomBackbone(config)


def test_missing_file_names_the_path_and_the_fix(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="make weights") as error:
        DetrCustomBackbone(DetrCustomConfig(backbone="resnet18", backbone_weights=str(path)))
    assert str(path) in str(error.value)


def test_mismatched_keys_are_listed(resnet18_file, tmp_path):
    reference, _ = resnet18_file
    state_dict = dict(reference.state_dict())
    del state_dict["layer1.0.conv1.weight"]
    state_dict["layer5.0.conv1.weight"] = torch.zeros(1)
    state_dict["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    path = _save(state_dict, tmp_path / "damaged.pth")
    with pytest.raises(ValueError) as error:
        DetrCustomBackbone(DetrCustomConfig(backbone="resnet18", backbone_weights=str(path)))
    message = str(error.value)
    assert "missing from the file (1): layer1.0.conv1.weight" in message
    assert "unexpected in the file (1): layer5.0.conv1.weight" in message
    assert "layer2.0.conv1.weight (128, 64, 1, 1) vs (128, 64, 3, 3)" in message
    assert "fc.weight" not in message                       # the classifier: features_only drops it, ignored


def test_file_of_another_architecture_is_refused(resnet18_file, tmp_path):
    _, resnet_path = resnet18_file
    with pytest.raises(ValueError, match=r"missing from the file \(\d+\): layer1\.2\.bn1\.bias"):
        DetrCustomBackbone(DetrCustomConfig(backbone="resnet34", backbone_weights=str(resnet_path)))
    with pytest.raises(ValueError, match="another architecture than mobilenetv2_100"):
        DetrCustomBackbone(DetrCustomConfig(backbone="mobilenetv2_100", backbone_weights=str(resnet_path)))
    mobilenet_path = _save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "mobilenet_v2.pth")
    with pytest.raises(ValueError, match="holds torchvision's MobileNetV2, but the backbone is resnet18"):
        DetrCustomBackbone(DetrCustomConfig(backbone="resnet18", backbone_weights=str(mobilenet_path)))
    with pytest.raises(ValueError, match="17 inverted-residual blocks, the backbone 26"):
        DetrCustomBackbone(DetrCustomConfig(backbone="mobilenetv2_120d", backbone_weights=str(mobilenet_path)))


def test_saved_folder_loads_after_the_weights_file_is_gone(resnet18_file, tmp_path):
    _, path = resnet18_file
    config = DetrCustomConfig(**tiny_kwargs(backbone_weights=str(path)))
    model = randomize_(DetrCustomForObjectDetection(config)).eval()
    model.save_pretrained(tmp_path / "folder")
    path.unlink()
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path / "folder").eval()
    assert loaded.config.backbone_weights == str(path)     # kept as a record of how the backbone began
    pixel_values, pixel_mask, _ = padded_batch()
    with torch.no_grad():
        expected, found = model(pixel_values, pixel_mask), loaded(pixel_values, pixel_mask)
    torch.testing.assert_close(found.logits, expected.logits, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no such file"):   # a model built anew from the config reads it
        DetrCustomForObjectDetection(loaded.config)


def test_training_arguments_reach_the_config(resnet18_file):
    from training.arguments import parse_args
    from training.build import build_model
    from training.data.schema import Categories

    from modeling_detr_custom.backbone_weights import file_sha256

    reference, path = resnet18_file
    model_args, _, _ = parse_args([
        "--backbone", "resnet18", "--backbone_weights", str(path), "--backbone_weights_sha256", file_sha256(path),
        "--d_model", "32", "--encoder_layers", "1", "--decoder_layers", "1", "--num_heads", "2", "--ffn_dim", "64"])
    model = build_model(model_args, Categories(ids=(1, 2), names=("a", "b")))
    assert model.config.backbone_weights == str(path) and model.config.backbone_weights_sha256 == file_sha256(path)
    found = next(value for name, value in model.named_parameters() if name.endswith("layer4.1.conv2.weight"))
    torch.testing.assert_close(found, reference.layer4[1].conv2.weight, rtol=0, atol=0)
