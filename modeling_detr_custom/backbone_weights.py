"""Local pretrained weights for the timm backbone (`config.backbone_weights`): read a .pth / .safetensors file,
check its sha256, map torchvision's key names to timm's, and load it strictly.

Formats: timm's own keys (a timm model's `state_dict()`), which torchvision's ResNets already share, and torchvision's
MobileNetV2 (`torchvision.models.mobilenet_v2().state_dict()`), mapped onto timm's `mobilenetv2_*`. A file saved by a
training script may wrap the tensors in {"state_dict": ...} or {"model": ...} and prefix them with "module." (DDP).
Strict: every tensor the backbone has must come from the file with its shape; file tensors the backbone lacks are
errors, except those of the layers that `features_only` drops (the classifier, and the head convolution of
EfficientNet-style models), which are ignored. Called by `backbone.py`, never while `from_pretrained` loads a folder.
"""
import hashlib
import pathlib
import re

import timm
import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

# how a user gets the file back; this repository's Makefile fetches the demo's MobileNetV2 weights
FETCH_HINT = "Copy the file there (in this repository: `make weights` fetches the demo's MobileNetV2 weights)"
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
LISTED_KEYS = 8                               # keys shown per kind in a mismatch error


def file_sha256(path: str | pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: pathlib.Path, expected: str) -> None:
    expected = expected.strip().lower()
    if not SHA256_PATTERN.fullmatch(expected):
        raise ValueError(f"backbone_weights_sha256={expected!r} is not a sha256 (64 hex digits); compute it with "
                         f"`sha256sum {path}` or set it to None to skip the check.")
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(
            f"backbone weights file {path} has sha256 {actual}, but backbone_weights_sha256 expects {expected}: the "
            f"file is damaged or a different one. Fetch the right file again or correct backbone_weights_sha256.")


def read_state_dict(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or torch.save file (`weights_only=True`: no pickled code runs), through timm's
    own reader: it unwraps {"state_dict": ...} / {"model": ...} and strips DDP's "module." prefix."""
    try:
        state_dict = timm.models.load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure means the same thing to the user
        kind = "safetensors" if path.suffix == ".safetensors" else "a torch.save state dict"
        raise ValueError(f"cannot read backbone weights file {path} as {kind}: {error}") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"backbone weights file {path} holds {type(state_dict).__name__}, not a state dict "
                         "(a dict from names to tensors, e.g. `torch.save(model.state_dict(), path)`).")
    return state_dict


def is_torchvision_mobilenet_v2(state_dict) -> bool:
    return "features.0.0.weight" in state_dict and "features.1.conv.0.0.weight" in state_dict


def torchvision_mobilenet_v2_to_timm(state_dict, timm_keys) -> dict[str, torch.Tensor]:
    """torchvision `mobilenet_v2` names -> timm `mobilenetv2_*` names. torchvision numbers its layers in one list
    (`features.0` the stem, `features.1..N-1` the inverted-residual blocks, `features.N` the 1x1 head conv); timm
    groups the blocks in stages (`blocks.<stage>.<index>`), taken here in order from the backbone's own keys."""
    layers = sorted({int(key.split(".")[1]) for key in state_dict if key.startswith("features.")})
    blocks = [layer for layer in layers if f"features.{layer}.conv.0.0.weight" in state_dict]
    timm_blocks = sorted({tuple(map(int, key.split(".")[1:3])) for key in timm_keys if key.startswith("blocks.")})
    if len(blocks) != len(timm_blocks):
        raise ValueError(f"the torchvision MobileNetV2 file has {len(blocks)} inverted-residual blocks, the backbone "
                         f"{len(timm_blocks)}: a different depth. Pick the timm model of the file's architecture "
                         "(torchvision's mobilenet_v2 is timm's mobilenetv2_100).")
    prefixes = {"features.0.0.": "conv_stem.", "features.0.1.": "bn1.", "classifier.1.": "classifier."}
    if layers[-1] not in blocks:                            # the 1x1 conv + BatchNorm to 1280 channels
        prefixes.update({f"features.{layers[-1]}.0.": "conv_head.", f"features.{layers[-1]}.1.": "bn2."})
    for layer, (stage, index) in zip(blocks, timm_blocks):
        source, target = f"features.{layer}.conv.", f"blocks.{stage}.{index}."
        if f"{source}3.weight" in state_dict:               # expand 1x1, depthwise 3x3, project 1x1
            parts = {"0.0.": "conv_pw.", "0.1.": "bn1.", "1.0.": "conv_dw.", "1.1.": "bn2.", "2.": "conv_pwl.",
                     "3.": "bn3."}
        else:                                               # expansion 1: depthwise 3x3, project 1x1
            parts = {"0.0.": "conv_dw.", "0.1.": "bn1.", "1.": "conv_pw.", "2.": "bn2."}
        prefixes.update({source + old: target + new for old, new in parts.items()})
    mapped = {}
    for key, value in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        mapped[prefixes[prefix] + key[len(prefix):] if prefix else key] = value
    return mapped


def keys_dropped_by_features_only(body: nn.Module, model_name: str, **create_kwargs) -> set[str]:
    """The state-dict keys of the full timm model (built on the meta device: no memory, no init cost) that its
    `features_only` version `body` lacks: the classifier and whatever head sits after the last feature stage."""
    try:
        with torch.device("meta"):
            full = timm.create_model(model_name, pretrained=False, **create_kwargs)
    except Exception:  # noqa: BLE001 - a model whose init cannot run on meta tensors is built for real
        full = timm.create_model(model_name, pretrained=False, **create_kwargs)
    return set(full.state_dict()) - set(body.state_dict())


def _listing(kind: str, keys) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - LISTED_KEYS} more)" if len(keys) > LISTED_KEYS else ""
    return f"\n  {kind} ({len(keys)}): {', '.join(keys[:LISTED_KEYS])}{more}"


def load_backbone_weights(model: nn.Module, path: str | pathlib.Path, sha256: str | None = None,
                          ignored_keys=frozenset(), model_name: str | None = None) -> None:
    """Loads the file at `path` into `model` (a timm model, `features_only` or not), strictly: a missing,
    unexpected or mis-shaped tensor is a `ValueError` listing them all. File keys in `ignored_keys` (those that
    `features_only` drops, see `keys_dropped_by_features_only`) are skipped. `sha256`: the file's expected hash."""
    path = pathlib.Path(path)
    name = model_name or type(model).__name__
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone_weights={str(path)!r}: no such file (relative paths start at the current directory, "
            f"{pathlib.Path.cwd()}). {FETCH_HINT}, or set backbone_weights=None for random / Hub weights.")
    if sha256 is not None:
        check_sha256(path, sha256)
    state_dict = read_state_dict(path)
    expected = model.state_dict()
    source_format = "timm"
    if is_torchvision_mobilenet_v2(state_dict):
        source_format = "torchvision MobileNetV2"
        if "conv_stem.weight" not in expected:
            raise ValueError(f"backbone weights file {path} holds torchvision's MobileNetV2, but the backbone is "
                             f"{name}: use backbone='mobilenetv2_100' (or the timm model matching the file).")
        state_dict = torchvision_mobilenet_v2_to_timm(state_dict, expected)
    ignored = set(state_dict) & set(ignored_keys) - set(expected)
    # torch's BatchNorm fills in a missing counter itself (files saved from frozen BatchNorm have none)
    missing = {key for key in set(expected) - set(state_dict) if not key.endswith("num_batches_tracked")}
    unexpected = set(state_dict) - set(expected) - ignored
    mis_shaped = {f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
                  for key in set(state_dict) & set(expected) if state_dict[key].shape != expected[key].shape}
    if missing or unexpected or mis_shaped:
        hint = ""
        fitting = len(set(state_dict) & set(expected)) - len(mis_shaped)
        if fitting < len(expected) / 2:
            hint = (f"\n  Only {fitting} of the backbone's {len(expected)} tensors are in the file with their shape: "
                    f"the file holds another architecture than {name} (file keys look like {sorted(state_dict)[:3]}, "
                    f"the backbone's like {sorted(expected)[:3]}).")
        raise ValueError(
            f"backbone weights file {path} ({source_format} format, {len(state_dict)} tensors) does not fit backbone "
            f"{name}:" + (_listing("missing from the file", missing) if missing else "")
            + (_listing("unexpected in the file", unexpected) if unexpected else "")
            + (_listing("shape in the file vs the backbone", mis_shaped) if mis_shaped else "") + hint
            + "\n  Pick the timm backbone of the file's architecture, or a file saved from that backbone.")
    model.load_state_dict({key: value for key, value in state_dict.items() if key not in ignored}, strict=False)
    logger.info(f"backbone {name}: loaded {len(state_dict) - len(ignored)} tensors from {path} ({source_format} "
                f"format); ignored {len(ignored)} that features_only drops: {sorted(ignored)[:LISTED_KEYS]}")
