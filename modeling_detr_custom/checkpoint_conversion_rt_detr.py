"""transformers' RT-DETRv2 checkpoints (`RTDetrV2ForObjectDetection`, model_type "rt_detr_v2", e.g. the
`PekingU/rtdetr_v2_r18vd` family) and RT-DETR (v1) ones (`RTDetrForObjectDetection`, "rt_detr", e.g.
`PekingU/rtdetr_r50vd`; the same modules, its deformable attention is v2's with offset scale 0.5 and bilinear
sampling) as our RT-DETR layout: the config and the key renaming. `checkpoint_conversion.py` calls these when
`from_pretrained` meets such a folder or Hub id.

What maps onto what (Lv et al. 2024, RT-DETRv2; transformers' modeling_rt_detr_v2):
- its ResNet-vd (`RTDetrResNetBackbone`, frozen BatchNorm) -> timm's `resnet18d` / `resnet34d` / `resnet50d` /
  `resnet101d`: the same deep stem and average-pool shortcuts; the basic-block variants add a 1x1 shortcut to the first
  block (`backbone_first_block_shortcut`);
- `encoder_input_proj` (1x1 conv + BatchNorm) -> `input_proj` with `projection_norm="batch"`;
- AIFI (one post-norm layer with GELU and the unnormalized 2D sine) -> our encoder with
  `encoder_activation_function="gelu"`, `position_embedding_type="sine_absolute"`;
- its CCFF -> `fusion` (same module names), `decoder_input_proj` -> ours;
- query selection (`enc_output`, `enc_score_head`, `enc_bbox_head`), denoising embedding, decoder layers, query
  position head and the per-layer heads -> ours, renamed.

Where the two differ by design (outputs equal on unpadded images, tests/test_checkpoint_conversion_rt_detr.py):
RT-DETRv2 ignores `pixel_mask` (padding is attended to and proposed from); we mask padding and never select a proposal
on it. (Proposals within 0.01 of the image border stay selectable in both, see `query_selection.py`.)
Only what its released checkpoints use is converted: 3 levels at strides 8, 16, 32, AIFI on the coarsest, the
"default" (bilinear) sampling; anything else is a clear error.
"""
import re

from .configuration_detr_custom import DetrCustomConfig

# RTDetrResNetConfig (layer_type, depths) -> the timm model with the same layout
RESNET_VD = {
    ("basic", (2, 2, 2, 2)): "resnet18d",
    ("basic", (3, 4, 6, 3)): "resnet34d",
    ("bottleneck", (3, 4, 6, 3)): "resnet50d",
    ("bottleneck", (3, 4, 23, 3)): "resnet101d",
}

# RTDetrV2Config field -> ours, same meaning
SAME_FIELDS = {
    "d_model": "d_model", "num_queries": "num_queries", "encoder_layers": "encoder_layers",
    "decoder_layers": "decoder_layers", "encoder_attention_heads": "encoder_attention_heads",
    "decoder_attention_heads": "decoder_attention_heads", "encoder_ffn_dim": "encoder_ffn_dim",
    "decoder_ffn_dim": "decoder_ffn_dim", "encoder_activation_function": "encoder_activation_function",
    "decoder_activation_function": "activation_function", "dropout": "dropout",
    "attention_dropout": "attention_dropout", "activation_dropout": "activation_dropout",
    "num_feature_levels": "num_feature_levels", "decoder_n_points": "decoder_n_points",
    "hidden_expansion": "hidden_expansion", "num_denoising": "num_denoising", "label_noise_ratio": "label_noise_ratio",
    "box_noise_scale": "box_noise_scale", "learn_initial_query": "learn_initial_query",
    "auxiliary_loss": "auxiliary_loss", "matcher_class_cost": "class_cost", "matcher_bbox_cost": "bbox_cost",
    "matcher_giou_cost": "giou_cost", "matcher_alpha": "focal_alpha", "matcher_gamma": "focal_gamma",
    "focal_loss_alpha": "varifocal_alpha", "weight_loss_vfl": "class_loss_coefficient",
    "weight_loss_bbox": "bbox_loss_coefficient", "weight_loss_giou": "giou_loss_coefficient",
    "id2label": "id2label", "label2id": "label2id",
}

# RTDetrV2Config's / RTDetrConfig's defaults of the fields above, for a config.json that leaves one out
RT_DETR_DEFAULTS = {
    "d_model": 256, "num_queries": 300, "encoder_layers": 1, "decoder_layers": 6, "encoder_attention_heads": 8,
    "decoder_attention_heads": 8, "encoder_ffn_dim": 1024, "decoder_ffn_dim": 1024,
    "encoder_activation_function": "gelu", "decoder_activation_function": "relu", "dropout": 0.0,
    "attention_dropout": 0.0, "activation_dropout": 0.0, "num_feature_levels": 3, "decoder_n_points": 4,
    "hidden_expansion": 1.0, "num_denoising": 100, "label_noise_ratio": 0.5, "box_noise_scale": 1.0,
    "learn_initial_query": False, "auxiliary_loss": True, "matcher_class_cost": 2.0, "matcher_bbox_cost": 5.0,
    "matcher_giou_cost": 2.0, "matcher_alpha": 0.25, "matcher_gamma": 2.0, "focal_loss_alpha": 0.75,
    "weight_loss_vfl": 1.0, "weight_loss_bbox": 5.0, "weight_loss_giou": 2.0,
}

# RTDetrV2Config values our layout assumes: field -> (default when absent, what to do instead)
REQUIRED_VALUES = {
    "normalize_before": (False, "a post-norm AIFI layer"),
    "with_box_refine": (True, "iterative box refinement"),
    "decoder_method": ("default", "bilinear sampling ('default')"),
    "decoder_offset_scale": (0.5, "offset_scale 0.5"),
    "positional_encoding_temperature": (10000, "temperature 10000"),
    "layer_norm_eps": (1e-5, "LayerNorm eps 1e-5"),
    "batch_norm_eps": (1e-5, "BatchNorm eps 1e-5"),
    "activation_function": ("silu", "SiLU in the cross-scale fusion"),
    "decoder_activation_function": ("relu", "ReLU in the decoder FFN"),
    "use_focal_loss": (True, "sigmoid classes"),
}


def _backbone(rt_config: dict) -> tuple[str, bool]:
    """(timm name, backbone_first_block_shortcut) for the checkpoint's ResNet-vd."""
    backbone = rt_config.get("backbone_config") or {}
    model_type = backbone.get("model_type")
    if model_type != "rt_detr_resnet":
        raise ValueError(f"this RT-DETR(v2) checkpoint's backbone has model_type {model_type!r}; only its ResNet-vd "
                         "(model_type 'rt_detr_resnet', the PekingU/rtdetr_v2_r*vd checkpoints) can be converted.")
    layer_type, depths = backbone.get("layer_type", "bottleneck"), tuple(backbone.get("depths", (3, 4, 6, 3)))
    name = RESNET_VD.get((layer_type, depths))
    problems = []
    if name is None:
        problems.append(f"layer_type={layer_type!r}, depths={list(depths)} (known: {sorted(RESNET_VD.values())})")
    if backbone.get("embedding_size", 64) != 64:
        problems.append(f"embedding_size={backbone['embedding_size']} (timm's deep stem has 64)")
    if backbone.get("downsample_in_first_stage", False) or backbone.get("downsample_in_bottleneck", False):
        problems.append("downsampling in the first stage or in the bottleneck's 1x1 conv (timm's is in the 3x3)")
    if backbone.get("hidden_act", "relu") != "relu":
        problems.append(f"hidden_act={backbone['hidden_act']!r}")
    out_indices = backbone.get("out_indices", [2, 3, 4])
    if list(out_indices) != [2, 3, 4]:
        problems.append(f"out_indices={out_indices} (the last three stages, [2, 3, 4], are supported)")
    if problems:
        raise ValueError("this RT-DETR(v2) checkpoint's ResNet has no timm equivalent: " + "; ".join(problems) + ".")
    return name, layer_type == "basic"


def convert_rt_detr_config(rt_config: dict) -> DetrCustomConfig:
    """transformers' RTDetrV2Config or RTDetrConfig (a config.json dict) -> our RT-DETR layout; clear errors for what
    it lacks."""
    backbone, first_block_shortcut = _backbone(rt_config)
    rt_config = {**RT_DETR_DEFAULTS, **rt_config}
    problems = []
    for field, (value, meaning) in REQUIRED_VALUES.items():
        if rt_config.get(field, value) != value:
            problems.append(f"{field}={rt_config[field]!r} (we support {value!r}: {meaning})")
    levels, d_model = rt_config["num_feature_levels"], rt_config["d_model"]
    hidden = rt_config.get("encoder_hidden_dim", 256)
    if levels != 3 or rt_config.get("decoder_n_levels", 3) != 3:
        problems.append(f"num_feature_levels={levels} (3 backbone levels are supported)")
    if list(rt_config.get("feat_strides", [8, 16, 32])) != [8, 16, 32]:
        problems.append(f"feat_strides={rt_config['feat_strides']}")
    if list(rt_config.get("encode_proj_layers", [2])) != [2]:
        problems.append(f"encode_proj_layers={rt_config['encode_proj_layers']} (AIFI on the coarsest level, [2])")
    if hidden != d_model or any(c != d_model for c in rt_config.get("decoder_in_channels", [d_model] * 3)):
        problems.append(f"encoder_hidden_dim={hidden} and decoder_in_channels "
                        f"{rt_config.get('decoder_in_channels')} must equal d_model={d_model}")
    if problems:
        raise ValueError("this RT-DETR(v2) checkpoint cannot be converted: " + "; ".join(problems) + ".")
    kwargs = {ours: rt_config[theirs] for theirs, ours in SAME_FIELDS.items() if theirs in rt_config}
    if "id2label" in kwargs:
        kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
    backbone_config = rt_config.get("backbone_config") or {}
    return DetrCustomConfig(
        backbone=backbone, backbone_first_block_shortcut=first_block_shortcut, use_pretrained_backbone=False,
        num_channels=backbone_config.get("num_channels", 3),
        freeze_batch_norm=rt_config.get("freeze_backbone_batch_norms", True), decoder_type="deformable",
        encoder_type="hybrid", two_stage=True, classification_loss="varifocal", projection_norm="batch",
        decoder_input_proj=True, position_embedding_type="sine_absolute", **kwargs)


def _stage_block(match: re.Match) -> str:
    stage, block = int(match.group(1)), match.group(2)
    return f"model.backbone.body.layer{stage + 1}.{block}."


# applied in order to every key. Both layouts: transformers 5 runs RTDetrV2 with `mlp.fc1`, `aifi`, `o_proj` and saves
# (and the Hub holds) `fc1`, `encoder.encoder`, `out_proj`
KEY_RULES = [
    (r"^model\.backbone\.model\.embedder\.embedder\.0\.convolution\.", "model.backbone.body.conv1.0."),
    (r"^model\.backbone\.model\.embedder\.embedder\.0\.normalization\.", "model.backbone.body.conv1.1."),
    (r"^model\.backbone\.model\.embedder\.embedder\.1\.convolution\.", "model.backbone.body.conv1.3."),
    (r"^model\.backbone\.model\.embedder\.embedder\.1\.normalization\.", "model.backbone.body.conv1.4."),
    (r"^model\.backbone\.model\.embedder\.embedder\.2\.convolution\.", "model.backbone.body.conv1.6."),
    (r"^model\.backbone\.model\.embedder\.embedder\.2\.normalization\.", "model.backbone.body.bn1."),
    (r"^model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", _stage_block),
    (r"(layer\d\.\d+\.)layer\.(\d)\.convolution\.", lambda m: f"{m.group(1)}conv{int(m.group(2)) + 1}."),
    (r"(layer\d\.\d+\.)layer\.(\d)\.normalization\.", lambda m: f"{m.group(1)}bn{int(m.group(2)) + 1}."),
    (r"\.shortcut\.(1\.)?convolution\.", ".downsample.1."),
    (r"\.shortcut\.(1\.)?normalization\.", ".downsample.2."),
    (r"^model\.encoder_input_proj\.(\d+)\.", r"model.input_proj.levels.\1."),
    (r"^model\.encoder\.(aifi|encoder)\.0\.layers\.", "model.encoder.layers."),
    (r"^model\.encoder\.(lateral_convs|fpn_blocks|downsample_convs|pan_blocks)\.", r"model.encoder.fusion.\1."),
    (r"^model\.enc_output\.0\.", "model.query_selection.enc_output."),
    (r"^model\.enc_output\.1\.", "model.query_selection.enc_output_norm."),
    (r"^model\.enc_score_head\.", "model.query_selection.enc_score_head."),
    (r"^model\.enc_bbox_head\.", "model.query_selection.enc_bbox_head."),
    (r"^model\.weight_embedding\.", "model.query_embed."),
    (r"^model\.decoder\.query_pos_head\.", "model.query_pos_head."),
    (r"^(model\.decoder\.)?class_embed\.(\d+)\.", r"model.class_embed.\2."),
    (r"^(model\.decoder\.)?bbox_embed\.(\d+)\.layers\.", r"model.bbox_embed.\2.layers."),
    (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
    (r"\.self_attn_layer_norm\.", ".norm1."),
    (r"\.encoder_attn_layer_norm\.", ".norm2."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.(mlp\.)?fc1\.", ".linear1."),
    (r"\.(mlp\.)?fc2\.", ".linear2."),
]


def _check_points_scale(key: str, scale) -> None:
    """RT-DETRv2 stores 1 / n for each of the n points of every level; ours derives the same from the config."""
    points = round(1 / float(scale[0])) if float(scale[0]) > 0 else 0
    if points < 1 or not bool((scale - 1 / points).abs().max() < 1e-6):
        raise ValueError(f"{key} is {scale.tolist()}, not 1 / points per point as RT-DETRv2 builds it; this "
                         "checkpoint cannot be converted (its sampling offsets would be scaled differently).")


def convert_rt_detr_state_dict(state_dict: dict) -> dict:
    """Their keys (RT-DETRv2's or RT-DETR's) -> ours. The heads exist twice in their model (`class_embed` and
    `model.decoder.class_embed`, tied); either copy is taken, and two copies that differ are an error."""
    converted = {}
    for key, value in state_dict.items():
        if key.endswith(".n_points_scale"):   # RT-DETRv2's per-point offset scale: derived from the config
            _check_points_scale(key, value)
            continue
        new_key = key
        for pattern, replacement in KEY_RULES:
            new_key = re.sub(pattern, replacement, new_key)
        if new_key in converted:
            if not (converted[new_key].shape == value.shape and bool((converted[new_key] == value).all())):
                raise ValueError(f"the checkpoint's tied copies of {new_key} differ ({key}); it is damaged.")
            continue
        converted[new_key] = value
    return converted
