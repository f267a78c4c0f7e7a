"""Checkpoint conversion that needs only state dicts and the config: the key-renaming rules from transformers' and
the original DETR's names to ours, transformers' DetrConfig -> DetrCustomConfig, and the temporary folder through
which `DetrCustomPreTrainedModel.from_pretrained` loads transformers DETR checkpoints (and RT-DETRv2 ones, converted
by `checkpoint_conversion_rt_detr.py`).

The model imports this file (it travels with it as Hub remote code); it never imports the model: the model class is
passed in where the expected keys are needed. Reading original `.pth` files and the CLI are in `convert.py`, a layer
above the model.
"""
import contextlib
import json
import os
import re
import tempfile

import torch

from .checkpoint_conversion_rt_detr import convert_rt_detr_config, convert_rt_detr_state_dict
from .configuration_detr_custom import DetrCustomConfig

HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")

# transformers DETR names (4.x checkpoints on the Hub, and 5.x runtime names) -> ours. Order matters: layer norms
# are renamed before `encoder_attn` becomes `cross_attn`.
TRANSFORMERS_KEY_RULES = [
    (r"backbone\.conv_encoder\.model\.", "backbone.body."),
    (r"backbone\.model\.", "backbone.body."),
    (r"(backbone\.)?position_embedding\.row_embeddings\.", "position_embedding.row_embed."),
    (r"(backbone\.)?position_embedding\.column_embeddings\.", "position_embedding.col_embed."),
    (r"input_projection\.", "input_proj."),
    (r"query_position_embeddings\.", "query_embed."),
    (r"\.self_attn_layer_norm\.", ".norm1."),
    (r"\.encoder_attn_layer_norm\.", ".norm2."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.(mlp\.)?fc1\.", ".linear1."),
    (r"\.(mlp\.)?fc2\.", ".linear2."),
    (r"decoder\.layernorm\.", "decoder.norm."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
]

# original facebookresearch/detr names -> ours; `in_proj_weight/bias` are split into q, k, v afterwards
ORIGINAL_KEY_RULES = [
    (r"^backbone\.0\.body\.", "model.backbone.body."),
    (r"^backbone\.1\.(row|col)_embed\.", r"model.position_embedding.\1_embed."),
    (r"^input_proj\.", "model.input_proj."),
    (r"^query_embed\.", "model.query_embed."),
    (r"^transformer\.encoder\.", "model.encoder."),
    (r"^transformer\.decoder\.", "model.decoder."),
    (r"\.multihead_attn\.", ".cross_attn."),
]


def _sequential_to_layers(match: re.Match) -> str:
    # an nn.Sequential(Linear, ReLU, Linear, ...) index 2j -> the MLP's `layers.j`
    return f"{match.group(1)}layers.{int(match.group(2)) // 2}."


# folders saved by earlier versions of this package -> today's names (applied in order): the hybrid encoder's fusion
# and the deformable encoder's level embeddings moved into their encoders (registry.py builds each part whole); the
# multi-scale MLPs were nn.Sequential (Linear at 0, 2, 4), now blocks.MLP (`layers.0, 1, 2`)
LEGACY_KEY_RULES = [
    (r"^model\.fusion\.", "model.encoder.fusion."),
    (r"^model\.level_embed$", "model.encoder.level_embed"),
    (r"^(model\.bbox_embed\.\d+\.)(\d+)\.", _sequential_to_layers),
    (r"^(model\.query_pos_head\.)(\d+)\.", _sequential_to_layers),
    (r"^(model\.(?:query_selection|extra_query_selections\.\d+)\.enc_bbox_head\.)(\d+)\.", _sequential_to_layers),
]

# fields with the same name and meaning in transformers' DetrConfig
SHARED_CONFIG_FIELDS = (
    "num_channels", "num_queries", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "activation_function", "dropout",
    "attention_dropout", "activation_dropout", "position_embedding_type", "auxiliary_loss", "class_cost", "bbox_cost",
    "giou_cost", "bbox_loss_coefficient", "giou_loss_coefficient", "eos_coefficient", "init_xavier_std",
    "id2label", "label2id",
)


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def convert_transformers_config(detr_config: dict) -> DetrCustomConfig:
    """transformers DetrConfig (as a config.json dict, 4.x or 5.x layout) -> DetrCustomConfig."""
    backbone_config = detr_config.get("backbone_config")
    if backbone_config:
        if backbone_config.get("model_type") != "timm_backbone":
            raise ValueError(
                "this DETR checkpoint uses a transformers backbone "
                f"(model_type {backbone_config.get('model_type')!r}); "
                "only timm backbones (use_timm_backbone=True, the default of facebook/detr-*) can be converted.")
        backbone = backbone_config["backbone"]
        dilation = bool(detr_config.get("dilation")) or backbone_config.get("output_stride") == 16
    else:
        if not detr_config.get("use_timm_backbone", True):
            raise ValueError("this DETR checkpoint has use_timm_backbone=False; only timm backbones can be converted.")
        backbone = detr_config.get("backbone") or "resnet50"
        dilation = bool(detr_config.get("dilation", False))
    kwargs = {field: detr_config[field] for field in SHARED_CONFIG_FIELDS if field in detr_config}
    # transformers' decoder feeds the normed state forward when auxiliary_loss is on: keep its outputs
    kwargs["normalize_decoder_residual"] = bool(detr_config.get("auxiliary_loss", False))
    return DetrCustomConfig(backbone=backbone, dilation=dilation, use_pretrained_backbone=False, **kwargs)


def convert_transformers_state_dict(state_dict: dict) -> dict:
    return {_rename(key, TRANSFORMERS_KEY_RULES): value for key, value in state_dict.items()
            if not key.endswith("num_batches_tracked")}


def convert_original_state_dict(state_dict: dict) -> dict:
    converted = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = _rename(key, ORIGINAL_KEY_RULES)
        if key.endswith(("in_proj_weight", "in_proj_bias")):
            prefix, kind = key.rsplit(".", 1)
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                converted[f"{prefix}.{name}.{kind.split('_')[-1]}"] = chunk.clone()
        else:
            converted[key] = value
    return converted


def convert_legacy_state_dict(state_dict: dict) -> dict:
    """A state dict saved by an earlier version of this package, in today's names (`LEGACY_KEY_RULES`)."""
    return {_rename(key, LEGACY_KEY_RULES): value for key, value in state_dict.items()}


def _has_legacy_keys(weights_file: str) -> bool:
    from safetensors import safe_open

    with safe_open(weights_file, framework="pt") as f:
        return any(_rename(key, LEGACY_KEY_RULES) != key for key in f.keys())


def check_converted_keys(model_class, config: DetrCustomConfig, state_dict: dict, source: str) -> None:
    """Raises unless `state_dict` has exactly the keys of `model_class(config)` (built on the meta device)."""
    with torch.device("meta"):
        expected = set(model_class(config).state_dict())
    # BatchNorm's step counters (unused with a momentum) are absent from some checkpoints and dropped from others
    missing = sorted(key for key in expected - set(state_dict) if not key.endswith("num_batches_tracked"))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"{source} does not convert cleanly: missing {missing[:8]} ({len(missing)} in all), "
                         f"unexpected {unexpected[:8]} ({len(unexpected)} in all).")


def _looks_like_a_path(name_or_path) -> bool:
    # "namespace/name" may be a Hub id or a relative folder: only what cannot be a Hub id counts as a path
    text = os.fspath(name_or_path)
    return (isinstance(name_or_path, os.PathLike) or text.startswith((".", "/", "~")) or text.count("/") > 1
            or (os.sep != "/" and os.sep in text))


def check_local_checkpoint(name_or_path, from_pretrained_kwargs: dict) -> None:
    """Clear errors for local folders that cannot load, raised before transformers gets them: a missing folder
    (instead of a Hub id format error), a folder without config.json (instead of a default ResNet-50 config that
    `ignore_mismatched_sizes=True` would fill with whatever fits), and a damaged config.json or model.safetensors.
    Anything that is not an existing folder and does not look like a path is left to the Hub as usual."""
    folder = os.path.expanduser(os.fspath(name_or_path))
    subfolder = from_pretrained_kwargs.get("subfolder") or ""
    if not os.path.isdir(folder):
        if _looks_like_a_path(name_or_path) and not os.path.exists(folder):
            raise FileNotFoundError(
                f"no such folder: {os.path.abspath(folder)}. from_pretrained takes a folder written by "
                "save_pretrained or a Hub model id such as 'facebook/detr-resnet-50'; check the path.")
        return
    folder = os.path.join(folder, subfolder)
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        if from_pretrained_kwargs.get("config") is not None:
            return                                                   # the caller gives the config
        raise FileNotFoundError(
            f"the folder {os.path.abspath(folder)} has no config.json, so the model's architecture is unknown. Save "
            "the model with save_pretrained (it writes config.json next to the weights), copy the config.json that "
            "belongs to these weights into the folder, or pass config=DetrCustomConfig(...).")
    try:
        with open(config_file) as f:
            json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise OSError(f"{os.path.abspath(config_file)} is damaged (not valid JSON: {error}); it may be truncated. "
                      "Re-download or re-save the model.") from error
    weights_file = os.path.join(folder, "model.safetensors")
    if os.path.isfile(weights_file):
        from safetensors import safe_open

        try:
            with safe_open(weights_file, framework="pt") as f:
                f.keys()
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            raise OSError(f"{os.path.abspath(weights_file)} is damaged ({error}); it may be truncated. "
                          "Re-download or re-save the model.") from error


def _load_weights(folder_files: dict) -> dict:
    if "model.safetensors" in folder_files:
        from safetensors.torch import load_file

        return load_file(folder_files["model.safetensors"])
    return torch.load(folder_files["pytorch_model.bin"], map_location="cpu", weights_only=True)


# config.json model_type -> (config converter, state-dict converter, name in messages)
CONVERTERS = {
    "detr": (convert_transformers_config, convert_transformers_state_dict, "DETR"),
    "rt_detr": (convert_rt_detr_config, convert_rt_detr_state_dict, "RT-DETR"),
    "rt_detr_v2": (convert_rt_detr_config, convert_rt_detr_state_dict, "RT-DETRv2"),
}


@contextlib.contextmanager
def converted_transformers_folder(name_or_path, from_pretrained_kwargs: dict, model_class):
    """Yields a temporary folder holding our config + converted weights if `name_or_path` is a transformers DETR,
    RT-DETR or RT-DETRv2 checkpoint (model_type "detr", "rt_detr", "rt_detr_v2", see `CONVERTERS`), else None. The
    converted keys must be those of `model_class` (our class with the heads, `DetrCustomForObjectDetection`). Hub
    options used to find the files are removed from `from_pretrained_kwargs` in the first case, since the temporary
    folder is local."""
    from transformers.utils import cached_file

    hub_kwargs = {k: from_pretrained_kwargs[k] for k in HUB_KWARGS if k in from_pretrained_kwargs}
    config_file = cached_file(name_or_path, "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if config_file is None:
        yield None
        return
    with open(config_file) as f:
        detr_config = json.load(f)
    model_type = detr_config.get("model_type")
    if model_type == DetrCustomConfig.model_type:   # ours: renamed only if saved with earlier names
        weights = cached_file(name_or_path, "model.safetensors", _raise_exceptions_for_missing_entries=False,
                              **hub_kwargs)
        if weights is None or not _has_legacy_keys(weights):
            yield None
            return
        from safetensors.torch import load_file, save_file

        state_dict = convert_legacy_state_dict(load_file(weights))
        for key in HUB_KWARGS:
            from_pretrained_kwargs.pop(key, None)
        with tempfile.TemporaryDirectory(prefix="detr_custom_renamed_") as folder:
            with open(os.path.join(folder, "config.json"), "w") as f:
                json.dump(detr_config, f)
            save_file(state_dict, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
            yield folder
        return
    if model_type not in CONVERTERS:
        yield None
        return
    files = {}
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is not None:
            files[name] = path
            break
    if not files:
        raise ValueError(f"{name_or_path} has a {model_type} config.json but no model.safetensors or "
                         "pytorch_model.bin.")
    convert_config, convert_state_dict, what = CONVERTERS[model_type]
    config = convert_config(detr_config)
    state_dict = convert_state_dict(_load_weights(files))
    check_converted_keys(model_class, config, state_dict, f"transformers {what} checkpoint {name_or_path}")
    for key in HUB_KWARGS:
        from_pretrained_kwargs.pop(key, None)
    with tempfile.TemporaryDirectory(prefix="detr_custom_converted_") as folder:
        _save_folder(config, state_dict, folder, model_class.__name__)
        yield folder


def _save_folder(config: DetrCustomConfig, state_dict: dict, folder: str, architecture: str) -> None:
    from safetensors.torch import save_file

    config.architectures = [architecture]
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
