"""The model card's facts as short (name, value) lines, from config.json, metrics.json["run"] and the folder.

Every function leaves out what the run did not record, so the card never says "More information needed".
"""
import json
import math
from pathlib import Path

from safetensors import SafetensorError, safe_open

# files a training output folder holds besides the code files -> what they are
KNOWN_FILES = {
    "model.safetensors": "weights", "model.safetensors.index.json": "index of the sharded weights",
    "config.json": "model config (`DetrCustomConfig`)", "preprocessor_config.json": "image processor config",
    "metrics.json": "the run's recipe, training losses and evaluations", "loss_curve.png": "training loss curve",
    "map_curve.png": "validation mAP curve", "predictions.png": "predictions on validation images",
}


# the class terms whose head is per-class sigmoid (num_labels logits, no "no object"): configuration_detr_custom.py's
# SIGMOID_CLASSIFICATION_LOSSES, and the (query, class) pairs its post-processing keeps: image_processing's
# SIGMOID_TOP_K (copied, so that rendering a card needs no torch; tests/test_hub_cards.py checks they are equal)
SIGMOID_LOSSES = ("focal", "varifocal")
SIGMOID_TOP_K = 100


def query_groups_text(config: dict) -> str:
    """What the query groups of a config do at training: Group DETR's (each matched one-to-one) or H-DETR's hybrid
    matching (`criterion="hybrid"`: the first one-to-one, the others one-to-many)."""
    groups, queries = config["num_query_groups"], config.get("num_queries")
    if config.get("criterion") == "hybrid":
        return (f"hybrid matching at training (H-DETR): {groups} groups of {queries} queries, the first matched "
                f"one-to-one, the other {groups - 1} one-to-many to every object repeated up to "
                f"{config.get('one_to_many_repeats', 6)} times")
    return f"{groups} groups of {queries} queries at training (Group DETR), each matched one-to-one"


def sigmoid_head(config: dict) -> bool:
    """Whether the class head is per-class sigmoid (configs saved before `classification_loss` are softmax)."""
    return config.get("classification_loss", "cross_entropy") in SIGMOID_LOSSES


def class_outputs(config: dict) -> int:
    """The class head's outputs: num_labels for a sigmoid head, num_labels + 1 ("no object" last) for softmax."""
    num_labels = len(config.get("id2label") or {})
    return num_labels if sigmoid_head(config) else num_labels + 1


def max_detections(config: dict) -> int:
    """Detections post-processing can return per image: one per query (softmax), or the best SIGMOID_TOP_K
    (query, class) pairs of queries x classes (sigmoid)."""
    queries = config.get("num_queries") or 0
    if sigmoid_head(config):
        return min(SIGMOID_TOP_K, queries * class_outputs(config))
    return queries


def measured(value) -> bool:
    """Whether a figure was measured: a number >= 0 (pycocotools writes -1 where there is no ground truth)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def percent(value) -> str:
    """A COCO figure in [0, 1] as a percentage; pycocotools' -1 ("no ground truth") and missing as "n/a"."""
    return f"{100 * value:.1f}" if measured(value) else "n/a"


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _safetensors_parameters(path: Path) -> int | None:
    """Number of values stored in a .safetensors file (shapes from its header: no tensor is loaded); None without one.

    framework="numpy" rather than "pt": the shapes are the same, and rendering a card then needs no torch.
    """
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="numpy") as f:
            return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}): the card counts its "
                         "parameters.") from error


POSITION_ENCODINGS = {
    "sine": "sine, normalized over each image's unpadded region (DETR's)",
    "learned": "learned row / column embeddings (up to 50 x 50 cells)",
    "sine_absolute": "sine of the cell indices, not normalized (RT-DETR's AIFI)",
}


def describe_design(config: dict) -> str:
    """Which DETR this config is, in words: decoder, levels, encoder, query selection, denoising, groups, head."""
    if config.get("decoder_type", "detr") != "deformable":
        parts = ["DETR (Carion et al. 2020): transformer encoder and decoder on the last backbone stage"]
    else:
        levels = config.get("num_feature_levels", 1)
        parts = [f"deformable decoder with iterative box refinement (Deformable DETR) on {levels} feature level"
                 f"{'s' if levels != 1 else ''}"]
        if config.get("encoder_type") == "hybrid":
            parts.append("RT-DETR's hybrid encoder (attention on the coarsest level + cross-scale fusion)")
        elif config.get("encoder_type") == "deformable":
            parts.append("Deformable DETR's encoder (deformable attention over every level)")
        else:
            parts.append("attention encoder on the coarsest level")
        if config.get("two_stage"):
            parts.append(f"query selection: the top {config.get('num_queries')} encoder proposals start the decoder")
        else:
            parts.append("learned queries with learned reference boxes")
        if config.get("num_denoising"):
            parts.append(f"{config['num_denoising']} denoising queries at training")
        if config.get("projection_norm") == "batch" and config.get("decoder_input_proj"):
            parts.append("RT-DETR's exact layout (loads its checkpoints)")
    if config.get("num_query_groups", 1) > 1:
        parts.append(query_groups_text(config))
    loss = config.get("classification_loss", "cross_entropy")
    parts.append({"cross_entropy": "softmax classes with a no-object class",
                  "focal": "sigmoid classes, focal loss",
                  "varifocal": "sigmoid classes, IoU-aware varifocal loss"}.get(loss, loss))
    return "; ".join(parts)


def describe_architecture(config: dict, output_dir: Path) -> list[tuple[str, str]]:
    lines = []
    if config.get("backbone"):
        dc5 = ", last stage dilated (DC5, output stride 16)" if config.get("dilation") else ""
        batch_norm = "BatchNorm frozen" if config.get("freeze_batch_norm", True) else "BatchNorm trained"
        stem = "; stem and first stage frozen" if config.get("freeze_backbone_stem") else ""
        lines.append(("Backbone", f"`{config['backbone']}` from timm{dc5}; {batch_norm}{stem}"))
    layers = [f"d_model {config['d_model']}"] if config.get("d_model") else []
    if config.get("encoder_layers") is not None and config.get("decoder_layers") is not None:
        layers.append(f"{config['encoder_layers']} encoder + {config['decoder_layers']} decoder layers")
    if config.get("encoder_attention_heads"):
        layers.append(f"{config['encoder_attention_heads']} attention heads")
    if config.get("encoder_ffn_dim"):
        layers.append(f"feed-forward {config['encoder_ffn_dim']}")
    if layers:
        lines.append(("Transformer", ", ".join(layers)))
    lines.append(("Design", describe_design(config)))
    position = config.get("position_embedding_type")
    if position:
        lines.append(("Position encoding", POSITION_ENCODINGS.get(position, position)))
    if config.get("num_queries"):
        queries = config["num_queries"]
        if sigmoid_head(config):
            limit = (f"post-processing keeps the best {max_detections(config)} (query, class) pairs of the "
                     f"{queries} queries x {class_outputs(config)} classes, so at most {max_detections(config)} "
                     "detections")
        else:
            limit = f"at most {queries} detections (one per query)"
        lines.append(("Object queries", f"{queries}: {limit}"))
    head = (f"{class_outputs(config)} outputs, one sigmoid per class (no 'no object' output)" if sigmoid_head(config)
            else f"{class_outputs(config)} outputs, softmax over the classes and 'no object' (the last one)")
    lines.append(("Class head", head))
    parameters = _safetensors_parameters(output_dir / "model.safetensors")
    if parameters:
        lines.append(("Parameters", f"{parameters / 1e6:.1f} M ({parameters:,} values in model.safetensors)"))
    lines.append(("Model type", f"`{config.get('model_type', 'detr_custom')}` (remote code in this repository)"))
    return lines


def describe_training_data(run: dict) -> list[tuple[str, str]]:
    lines = [("Dataset", run["dataset"])] if run.get("dataset") else []
    for key, split, name in (("train_images", "train_split", "Training images"),
                             ("val_images", "val_split", "Validation images")):
        if run.get(key) is not None:
            lines.append((name, str(run[key]) + (f" (split `{run[split]}`)" if run.get(split) else "")))
    return lines


def describe_origin(run: dict, config: dict, base_model: str | None) -> tuple[str, str]:
    """Where the weights started, as (summary phrase, recipe line), from the run's checkpoint and the config's
    backbone weights (a local file, timm's pretrained weights, or none)."""
    if base_model:
        return (f"fine-tuned from [{base_model}](https://huggingface.co/{base_model})",
                f"[{base_model}](https://huggingface.co/{base_model})")
    if run.get("model_name_or_path"):
        return f"fine-tuned from `{run['model_name_or_path']}`", f"`{run['model_name_or_path']}`"
    if config.get("backbone_weights"):   # a local file replaces timm's download; its name only (no local paths)
        sha256 = config.get("backbone_weights_sha256")
        backbone = (f"the local weights file `{Path(config['backbone_weights']).name}`"
                    + (f" (sha256 {sha256[:12]}…)" if sha256 else ""))
    elif config.get("use_pretrained_backbone"):
        backbone = f"timm's pretrained `{config.get('backbone')}` weights"
    else:
        return ("trained from scratch (every weight started random)",
                "no checkpoint: every weight started random")
    return (f"its backbone initialized from {backbone}, the transformer and heads trained from scratch",
            f"no DETR checkpoint: transformer and heads from random weights, backbone from {backbone}")


def describe_length(run: dict) -> tuple[str, str] | None:
    """How long the run trained: optimizer steps (and the passes over the data they make) for a run sized in steps
    (max_steps or a time budget), epochs (and their steps) for one sized in epochs."""
    steps, epochs = run.get("global_steps"), run.get("num_train_epochs")
    budget = run.get("budget") or {}
    by_steps = (isinstance(run.get("max_steps"), int) and run["max_steps"] > 0) or budget.get("total_steps")
    if by_steps and steps is not None:
        passes = ""
        if isinstance(epochs, (int, float)) and run.get("train_images"):
            passes = f" ({epochs:.3g} passes over the {run['train_images']} training images)"
        sized = "the time budget below" if budget.get("total_steps") else f"max_steps {run['max_steps']}"
        return "Length", f"{steps} optimizer steps{passes}, set by {sized}"
    if epochs is not None:
        return "Epochs", f"{_number(epochs)}" + (f" ({steps} optimizer steps)" if steps is not None else "")
    return None


def describe_recipe(run: dict, config: dict, base_model: str | None) -> list[tuple[str, str]]:
    lines = [("Initialized from", describe_origin(run, config, base_model)[1])]
    length = describe_length(run)
    if length:
        lines.append(length)
    if run.get("total_batch_size") is not None:
        count = run.get("num_processes")
        processes = f" over {count} process{'es' if count > 1 else ''}" if count else ""
        lines.append(("Total batch size", f"{run['total_batch_size']}{processes}"))
    if run.get("learning_rate") is not None:
        lr = f"{_number(run['learning_rate'])} (transformer and heads)"
        if run.get("backbone_learning_rate") is not None:
            lr += f", {_number(run['backbone_learning_rate'])} (backbone)"
        lines.append(("Learning rate", lr))
    for key, name in (("weight_decay", "Weight decay"), ("lr_scheduler", "Learning-rate schedule"),
                      ("max_grad_norm", "Gradient clipping (max norm)"), ("mixed_precision", "Mixed precision"),
                      ("augmentation", "Augmentation"), ("image_size", "Image size"), ("hardware", "Hardware")):
        if run.get(key) is not None:
            lines.append((name, _number(run[key])))
    used = run.get("mixed_precision_used")
    if used is not None and run.get("mixed_precision") is not None and used != run["mixed_precision"]:
        lines.append(("Precision used", f"{used} ({run['mixed_precision']} asked; bf16 is emulated on this CPU)"))
    budget = run.get("budget")
    if budget and budget.get("seconds_per_step") is not None:   # None: the run ended before the budget sized it
        lines.append(("Time budget", f"{_number(budget['minutes'])} min: {budget['seconds_per_step']:.2f} s/step and "
                                     f"{budget['eval_seconds']:.1f} s per evaluation measured, "
                                     f"{budget['total_steps']} of at most {budget['upper_bound']} steps"
                                     + (f"; stopped at step {budget['stopped_early_at']} by its deadline (the steps "
                                        "ran slower than measured)" if budget.get("stopped_early_at") else "")))
    if config.get("classification_loss", "cross_entropy") != "cross_entropy":
        paper = {"focal": "Deformable DETR", "varifocal": "RT-DETR"}.get(config["classification_loss"], "")
        lines.append(("Class loss", f"{config['classification_loss']} ({paper}): per-class sigmoid, no 'no object' "
                                    "class"))
    if (config.get("num_query_groups") or 1) > 1:
        lines.append(("Query groups", f"{query_groups_text(config)}; one group at inference"))
    ema = run.get("ema")
    if ema:
        lines.append(("Weights", f"exponential moving average of the trained weights (decay {_number(ema['decay'])}, "
                                 f"warm-up {ema['warmup_steps']} steps): evaluated and saved"))
    if run.get("wall_time_s") is not None:
        lines.append(("Wall time", _duration(run["wall_time_s"])))
    if run.get("seed") is not None:
        lines.append(("Seed", str(run["seed"])))
    return lines


def describe_post_processing(output_dir: Path, run: dict) -> list[tuple[str, str]]:
    """The duplicate removal the folder's processor applies (its preprocessor_config.json's `nms_iou_threshold`, else
    the run's setting): a line when there is one."""
    processor_file = output_dir / "preprocessor_config.json"
    threshold = (json.loads(processor_file.read_text()) if processor_file.is_file() else run).get("nms_iou_threshold")
    if threshold is None:
        return []
    return [("Post-processing", f"class-wise non-maximum suppression at IoU {_number(threshold)} (the processor's "
                                "`nms_iou_threshold`: `post_process_object_detection` and `pipeline` remove a "
                                "detection overlapping a higher-scored one of its class by more; pass "
                                "`nms_iou_threshold=1.0` to keep them)")]


def describe_files(output_dir: Path) -> str:
    present = sorted(path.name for path in output_dir.iterdir() if path.is_file())
    lines = [f"- `{name}`: {KNOWN_FILES[name]}" for name in present if name in KNOWN_FILES]
    code = [f"`{name}`" for name in present if name.endswith(".py")]
    if code:
        lines.append(f"- {', '.join(code)}: the model code that `trust_remote_code=True` loads")
    return "\n".join(lines) if lines else "The card was rendered before the model files were saved."
