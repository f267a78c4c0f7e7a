"""Loading existing DETR checkpoints into DetrCustomForObjectDetection.

- transformers' DetrForObjectDetection folders / Hub ids (model_type "detr", e.g. facebook/detr-resnet-50):
  converted on the fly by `DetrCustomForObjectDetection.from_pretrained` through `converted_transformers_folder`.
- original facebookresearch/detr checkpoints (`{"model": state_dict, "args": Namespace?}`):
  `python -m modeling_detr_custom.convert --original detr-r50-e632da11.pth --output-dir detr-r50`
  (also installed as `detr-custom-convert`).
"""
import argparse
import contextlib
import json
import os
import re
import tempfile

import torch

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

# fields with the same name and meaning in transformers' DetrConfig
SHARED_CONFIG_FIELDS = (
    "num_channels", "num_queries", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "activation_function", "dropout",
    "attention_dropout", "activation_dropout", "position_embedding_type", "auxiliary_loss", "class_cost", "bbox_cost",
    "giou_cost", "bbox_loss_coefficient", "giou_loss_coefficient", "eos_coefficient", "init_xavier_std",
    "id2label", "label2id",
)

# COCO 2017 category names by id (ids 1..90 with gaps), for original checkpoints trained on COCO (91 outputs)
COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant N/A stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe N/A backpack umbrella N/A N/A "
    "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle N/A wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed N/A dining_table N/A N/A toilet N/A tv laptop mouse "
    "remote keyboard cell_phone microwave oven toaster sink refrigerator N/A book clock vase scissors teddy_bear "
    "hair_drier toothbrush"
).split()


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


def _check_keys(config: DetrCustomConfig, state_dict: dict, source: str) -> None:
    from .modeling_detr_custom import DetrCustomForObjectDetection

    with torch.device("meta"):
        expected = set(DetrCustomForObjectDetection(config).state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"{source} does not convert cleanly: missing {missing[:8]} ({len(missing)} in all), "
                         f"unexpected {unexpected[:8]} ({len(unexpected)} in all).")


def _load_weights(folder_files: dict) -> dict:
    if "model.safetensors" in folder_files:
        from safetensors.torch import load_file

        return load_file(folder_files["model.safetensors"])
    return torch.load(folder_files["pytorch_model.bin"], map_location="cpu", weights_only=True)


@contextlib.contextmanager
def converted_transformers_folder(name_or_path, from_pretrained_kwargs: dict):
    """Yields a temporary folder holding our config + converted weights if `name_or_path` is a transformers DETR
    checkpoint (model_type "detr"), else None. Hub options used to find the files are removed from
    `from_pretrained_kwargs` in the first case, since the temporary folder is local."""
    from transformers.utils import cached_file

    hub_kwargs = {k: from_pretrained_kwargs[k] for k in HUB_KWARGS if k in from_pretrained_kwargs}
    config_file = cached_file(name_or_path, "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if config_file is None:
        yield None
        return
    with open(config_file) as f:
        detr_config = json.load(f)
    if detr_config.get("model_type") != "detr":
        yield None
        return
    files = {}
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is not None:
            files[name] = path
            break
    if not files:
        raise ValueError(f"{name_or_path} has a DETR config.json but no model.safetensors or pytorch_model.bin.")
    config = convert_transformers_config(detr_config)
    state_dict = convert_transformers_state_dict(_load_weights(files))
    _check_keys(config, state_dict, f"transformers DETR checkpoint {name_or_path}")
    for key in HUB_KWARGS:
        from_pretrained_kwargs.pop(key, None)
    with tempfile.TemporaryDirectory(prefix="detr_custom_converted_") as folder:
        _save_folder(config, state_dict, folder)
        yield folder


def _save_folder(config: DetrCustomConfig, state_dict: dict, folder: str) -> None:
    from safetensors.torch import save_file

    config.architectures = ["DetrCustomForObjectDetection"]
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})


def _infer_resnet(state_dict: dict) -> str:
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"backbone\.0\.body\.layer3\.(\d+)\.", k))}
    bottleneck = any(".conv3." in k for k in state_dict if k.startswith("backbone.0.body.layer1."))
    names = {(True, 6): "resnet50", (True, 23): "resnet101", (True, 36): "resnet152",
             (False, 2): "resnet18", (False, 6): "resnet34"}
    if (bottleneck, len(blocks)) not in names:
        raise ValueError("cannot infer the ResNet depth from the checkpoint; pass --backbone.")
    return names[(bottleneck, len(blocks))]


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


def convert_original_checkpoint(checkpoint_path, output_dir=None, backbone=None, dilation=None, num_heads=None):
    """Reads an original facebookresearch/detr checkpoint (`torch.load(weights_only=True)`) and returns our
    DetrCustomForObjectDetection with its weights (saved with save_pretrained to `output_dir` when given).

    The number of classes, queries, layers and widths are read from the weights; backbone, dilation, heads and
    auxiliary loss from the checkpoint's `args` when present, else from the arguments (defaults: the ResNet depth
    inferred from the weights, no dilation, 8 heads)."""
    from .modeling_detr_custom import DetrCustomForObjectDetection

    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("model", checkpoint)
    if "class_embed.weight" not in state_dict:
        raise ValueError(f"{checkpoint_path} is not an original DETR checkpoint: no 'class_embed.weight' in it.")
    args = vars(checkpoint.get("args") or argparse.Namespace())
    if args.get("pre_norm"):
        raise ValueError("pre-norm DETR checkpoints (args.pre_norm=True) are not supported: our layers are post-norm.")
    if args.get("masks"):
        state_dict = {k[len("detr."):]: v for k, v in state_dict.items() if k.startswith("detr.")}

    def count(prefix):
        return 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(prefix + r"\.(\d+)\.", k)))

    num_labels = state_dict["class_embed.weight"].shape[0] - 1
    config = DetrCustomConfig(
        backbone=backbone or args.get("backbone") or _infer_resnet(state_dict),
        dilation=bool(dilation if dilation is not None else args.get("dilation", False)),
        use_pretrained_backbone=False,
        num_labels=num_labels,
        id2label={i: name for i, name in enumerate(COCO_NAMES, start=1)} | {0: "N/A"} if num_labels == 91 else None,
        num_queries=state_dict["query_embed.weight"].shape[0],
        d_model=state_dict["class_embed.weight"].shape[1],
        encoder_layers=count(r"transformer\.encoder\.layers"),
        decoder_layers=count(r"transformer\.decoder\.layers"),
        encoder_attention_heads=num_heads or args.get("nheads", 8),
        decoder_attention_heads=num_heads or args.get("nheads", 8),
        encoder_ffn_dim=state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0],
        decoder_ffn_dim=state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0],
        position_embedding_type="learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
        auxiliary_loss=args.get("aux_loss", True),
    )
    converted = convert_original_state_dict(state_dict)
    _check_keys(config, converted, f"original DETR checkpoint {checkpoint_path}")
    model = DetrCustomForObjectDetection(config)
    model.load_state_dict(converted, strict=True)
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert an original facebookresearch/detr checkpoint into a "
                                                 "Hugging Face folder loadable with from_pretrained.")
    parser.add_argument("--original", required=True, help="path to the .pth file (e.g. detr-r50-e632da11.pth)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--backbone", default=None, help="timm name, e.g. resnet50 or resnet101 (default: inferred)")
    parser.add_argument("--dilation", action="store_true", default=None, help="DC5 checkpoints")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads (default: args or 8)")
    args = parser.parse_args(argv)
    model = convert_original_checkpoint(args.original, args.output_dir, args.backbone, args.dilation, args.num_heads)
    print(f"wrote {args.output_dir}: {model.config.backbone}, {model.config.num_labels} labels, "
          f"{model.config.num_queries} queries")


if __name__ == "__main__":
    main()
