"""The training script's arguments: three dataclasses, ModelArguments, DataArguments and TrainArguments.

ModelArguments is generated from DetrCustomConfig: one flag per config field (help from the config docstring's Args,
choices from its FIELD_CHOICES), default None = not given (then the preset's, the checkpoint's or the config's
value holds), plus `--model_name_or_path`, `--preset` and the shortcuts `--num_heads`, `--ffn_dim` (and `--dropout`,
which also sets the attention and activation dropouts). The config module is read from its source, not imported, so
that `--help` prints without loading torch.

A yaml/json file (`--config FILE`) gives the values, the command line overrides them, `--help` lists them by purpose;
unknown keys in the file are errors.
"""
import argparse
import ast
import importlib
import importlib.util
import re
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from pathlib import Path

import yaml


# ---------------------------------------------------------------- the model's flags, from the config's source


@dataclass(frozen=True)
class ConfigField:
    """One DetrCustomConfig field as the flags see it: its type (bool, int, float or str; a flag's value may also be
    None = not given), its default, the docstring's words for it and its choices."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple | None


def config_source() -> Path:
    """configuration_detr_custom.py of the package that `import modeling_detr_custom` would load (not imported)."""
    spec = importlib.util.find_spec("modeling_detr_custom")
    return Path(spec.origin).parent / "configuration_detr_custom.py"


def _first_sentence(text: str) -> str:
    end = re.search(r"(?<!e\.g)(?<!i\.e)(?<!\bal)\.\s+(?=\S)", text)   # not at "e.g. ", "et al. "
    return text[:end.start() + 1] if end else text


def _docstring_args(docstring: str) -> dict[str, str]:
    """The first sentence of the Args section's entry of each field (--help's words; the docstring has the rest);
    `a, b: words` documents both."""
    entries, names, lines = {}, None, []
    section = docstring.split("Args:", 1)[1]
    for line in section.splitlines() + [""]:
        start = re.match(r"^    ([a-z_0-9]+(?:, [a-z_0-9]+)*): (.*)$", line)
        if start or (names and not line.strip() and lines):
            if names and lines:
                text = _first_sentence(" ".join(" ".join(lines).split()).replace("`", ""))
                entries.update({name: text for name in names if name not in entries})
            names, lines = (start.group(1).split(", "), [start.group(2)]) if start else (names, [])
            if not start:
                names = None   # a blank line ends the first paragraph: the rest is detail
        elif names and line.startswith("        "):
            lines.append(line.strip())
    return entries


def _literal(node, constants: dict):
    """A literal, a name of a module-level literal, or a dict of those."""
    if isinstance(node, ast.Name):
        return constants[node.id]
    if isinstance(node, ast.Dict):
        return {_literal(k, constants): _literal(v, constants) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def read_config_source(path: Path | None = None) -> tuple[list[ConfigField], dict[str, dict]]:
    """(DetrCustomConfig's own fields in order, PRESETS), read from the module's source."""
    tree = ast.parse((path or config_source()).read_text())
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = _literal(node.value, constants)
            except (ValueError, KeyError, TypeError):   # not a literal (a function call, a class): not needed
                pass
    choices = constants.get("FIELD_CHOICES", {})
    config_class = next(node for node in tree.body
                        if isinstance(node, ast.ClassDef) and node.name == "DetrCustomConfig")
    docs = _docstring_args(ast.get_docstring(config_class))
    config_fields = []
    for node in config_class.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        kinds = [part.strip() for part in ast.unparse(node.annotation).split("|")]
        kind = next(k for name, k in (("bool", bool), ("float", float), ("int", int), ("str", str)) if name in kinds)
        name = node.target.id
        config_fields.append(ConfigField(name, kind, ast.literal_eval(node.value), docs.get(name, ""),
                                         tuple(choices[name]) if name in choices else None))
    return config_fields, constants.get("PRESETS", {})


CONFIG_FIELDS, PRESETS = read_config_source()
CONFIG_DEFAULTS = {f.name: f.default for f in CONFIG_FIELDS}
# training flags that set several config fields (each of those, when given itself, wins)
SHORTCUTS = {"num_heads": ("encoder_attention_heads", "decoder_attention_heads"),
             "ffn_dim": ("encoder_ffn_dim", "decoder_ffn_dim"),
             "dropout": ("dropout", "attention_dropout", "activation_dropout")}
# where the training script's default differs from the config's: it downloads nothing unless asked
TRAINING_DEFAULTS = {"use_pretrained_backbone": False}
TRAINING_NOTES = {
    "use_pretrained_backbone": "New models only (the training script's default is false).",
    "backbone_weights": "New models only. `make weights` fetches ImageNet MobileNetV2 weights (backbone "
                        "mobilenetv2_100).",
    "backbone_weights_sha256": "New models only.",
    "dropout": "Also sets attention_dropout and activation_dropout, unless they are given.",
}
# the model flags by purpose, in --help's order; a config field not listed here gets its flag in "model: other"
MODEL_GROUPS = {
    "model: where it starts": ("model_name_or_path", "preset"),
    "model: backbone": ("backbone", "use_pretrained_backbone", "backbone_weights", "backbone_weights_sha256",
                        "num_channels", "dilation", "freeze_backbone_stem", "freeze_batch_norm",
                        "backbone_first_block_shortcut"),
    "model: transformer": ("encoder_type", "decoder_type", "d_model", "encoder_layers", "decoder_layers", "num_heads",
                           "encoder_attention_heads", "decoder_attention_heads", "ffn_dim", "encoder_ffn_dim",
                           "decoder_ffn_dim", "activation_function", "encoder_activation_function", "dropout",
                           "attention_dropout", "activation_dropout", "position_embedding_type",
                           "normalize_decoder_residual", "init_xavier_std", "batch_independent_inference"),
    "model: queries and multi-scale features (deformable decoder)": (
        "num_queries", "num_query_groups", "num_feature_levels", "finest_level_stride", "decoder_n_points",
        "encoder_n_points", "hidden_expansion", "projection_norm", "decoder_input_proj", "two_stage",
        "learn_initial_query", "num_denoising", "label_noise_ratio", "box_noise_scale"),
    "model: loss and matching": ("criterion", "one_to_many_repeats", "auxiliary_loss", "classification_loss",
                                 "class_cost", "bbox_cost", "giou_cost", "class_loss_coefficient",
                                 "bbox_loss_coefficient", "giou_loss_coefficient", "eos_coefficient", "focal_alpha",
                                 "focal_gamma", "varifocal_alpha"),
}


def _preset_help() -> str:
    described = "; ".join(f"{name}: " + (", ".join(f"{k}={v}" for k, v in values.items()) or "the config defaults")
                          for name, values in PRESETS.items())
    return ("A new model from a preset's values (DetrCustomConfig.from_preset; flags given override them): "
            f"{described}. Not with model_name_or_path (a checkpoint has its variant). None: the config defaults.")


def _model_fields() -> list[tuple]:
    """make_dataclass's (name, type, field) for ModelArguments, in MODEL_GROUPS' order."""
    by_name = {f.name: f for f in CONFIG_FIELDS}
    extra = {
        "model_name_or_path": (str, "Start from this checkpoint: our folder, a transformers DETR / RT-DETR(v2) "
                                    "folder or Hub id (e.g. facebook/detr-resnet-50) or a converted original. Its "
                                    "class head is replaced to fit the dataset's classes; model flags given are "
                                    "applied to its config (architecture flags that differ from it are refused). "
                                    "None: a new model.", None),
        "preset": (str, _preset_help(), tuple(PRESETS) or None),
        "num_heads": (int, "Attention heads of the encoder and the decoder (sets encoder_attention_heads and "
                           f"decoder_attention_heads, unless they are given). Default: "
                           f"{CONFIG_DEFAULTS['encoder_attention_heads']}.", None),
        "ffn_dim": (int, "Feed-forward width of the encoder and the decoder (sets encoder_ffn_dim and "
                         f"decoder_ffn_dim, unless they are given). Default: {CONFIG_DEFAULTS['encoder_ffn_dim']}.",
                    None),
    }
    grouped = {name: group for group, names in MODEL_GROUPS.items() for name in names}
    order = [name for names in MODEL_GROUPS.values() for name in names if name in by_name or name in extra]
    order += [f.name for f in CONFIG_FIELDS if f.name not in grouped]
    result = []
    for name in order:
        if name in extra:
            kind, help_text, choices = extra[name]
        else:
            config_field = by_name[name]
            kind, choices = config_field.type, config_field.choices
            default = TRAINING_DEFAULTS.get(name, config_field.default)
            help_text = " ".join(filter(None, (config_field.help, TRAINING_NOTES.get(name),
                                               f"Default: {default}." if default is not None else "")))
        metadata = {"help": help_text, "group": grouped.get(name, "model: other"),
                    **({"choices": choices} if choices else {})}
        result.append((name, kind | None, field(default=None, metadata=metadata)))
    return result


ModelArguments = make_dataclass("ModelArguments", _model_fields(), namespace={"__module__": __name__, "__doc__": (
    "The model: every DetrCustomConfig field (None = not given), model_name_or_path, preset and the shortcuts "
    "num_heads / ffn_dim.")})


def _paper(name: str):
    """A size list's default: training.transforms' constant, imported when the arguments are made (not for --help)."""
    return lambda: list(getattr(importlib.import_module(".transforms", __package__), name))


@dataclass
class DataArguments:
    data_dir: str | None = field(default=None, metadata={
        "help": "COCO 2017 layout: DATA_DIR/annotations/instances_{train,val}2017.json, DATA_DIR/{train,val}2017/."})
    train_annotation_file: str | None = field(default=None, metadata={"help": "Any COCO json (with train_image_dir)."})
    train_image_dir: str | None = field(default=None, metadata={"help": "The images of train_annotation_file."})
    val_annotation_file: str | None = field(default=None, metadata={"help": "Any COCO json (with val_image_dir)."})
    val_image_dir: str | None = field(default=None, metadata={"help": "The images of val_annotation_file."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "A Hub dataset (or a save_to_disk folder) with image + objects{bbox, category, area, id}."})
    bbox_format: str | None = field(default=None, metadata={
        "help": "Hub datasets only, required there: 'xywh' or 'xyxy'."})
    bbox_normalized: bool = field(default=False, metadata={"help": "Hub datasets: boxes are in [0, 1]."})
    train_split: str = field(default="train", metadata={"help": "Hub datasets: the training split."})
    val_split: str = field(default="validation", metadata={"help": "Hub datasets: the validation split."})
    write_demo_data: bool = field(default=False, metadata={
        "help": "Write the embedded synthetic dataset into data_dir first (the demo)."})
    train_scales: list[int] = field(default_factory=_paper("PAPER_SCALES"), metadata={
        "help": "Shortest-edge sizes for multi-scale training (paper: 480..800 by 32)."})
    eval_size: int = field(default=800, metadata={"help": "Shortest edge at evaluation and in the saved processor."})
    max_size: int = field(default=1333, metadata={"help": "Longest edge limit."})
    nms_iou_threshold: float | None = field(default=None, metadata={
        "help": "Remove duplicate detections at evaluation and in the saved processor (class-wise non-maximum "
                "suppression above this IoU: DetrCustomImageProcessor's nms_iou_threshold). None: off (DETR's "
                "one-to-one matching); finetune_small.yaml: 0.7."})
    random_crop: bool = field(default=True, metadata={
        "help": "The paper's random choice between resize and resize + random crop + resize; False: resize only."})
    crop_resize_scales: list[int] = field(default_factory=_paper("PAPER_CROP_RESIZE_SCALES"), metadata={
        "help": "Shortest-edge sizes of the resize before the random crop (paper: 400, 500, 600)."})
    crop_size: list[int] = field(default_factory=_paper("PAPER_CROP_SIZE"), metadata={
        "help": "Min and max side of the random crop."})
    # augmentations as RT-DETR / YOLO use them (training.transforms.with_augmentations); all off by default
    photometric_distort: float = field(default=0.0, metadata={
        "help": "Probability of each colour change (brightness, contrast, saturation, hue; RT-DETR: 0.5). 0: off."})
    zoom_out: float = field(default=0.0, metadata={
        "help": "Probability of placing the image on a larger empty canvas (SSD / RT-DETR: 0.5). 0: off."})
    zoom_out_max: float = field(default=4.0, metadata={"help": "Largest canvas side, in image sides (4)."})
    iou_crop: float = field(default=0.0, metadata={
        "help": "Probability of SSD's IoU-aware random crop (RT-DETR: 0.8). 0: off."})
    scale_jitter: list[float] | None = field(default=None, metadata={
        "help": "Two factors [low, high]: after the resize, scale by a factor drawn between them (capped at "
                "max_size). None: off."})
    mosaic: float = field(default=0.0, metadata={
        "help": "Probability that a training image becomes a 2 x 2 mosaic of four images of its batch (YOLO). "
                "0: off."})
    vertical_flip: bool = field(default=False, metadata={
        "help": "Random top-bottom flips (overhead and microscopy images, which have no 'up')."})
    rotate90: bool = field(default=False, metadata={
        "help": "Random quarter turns (0, 90, 180, 270 degrees; overhead and microscopy images)."})
    check_policy: str = field(default="skip", metadata={
        "help": "Bad images/boxes found by the dataset check: 'skip' (report them) or 'error'."})
    check_images: str = field(default="auto", metadata={
        "help": "How the dataset check reads image files: 'decode' (every image fully, in threads: finds truncated "
                "files; ~1 s per 1000 small images), 'header' (sizes only, fast), 'auto' (decode up to 20000 "
                "images, else headers). An image that fails later is skipped and logged, never a crash."})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers per process."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Train on the first N training images only (quick trials). None: all."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Evaluate on the first N validation images only. None: all."})


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/run", metadata={"help": "Checkpoints, metrics, pictures, best/, last/."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Reuse an output_dir that holds a run."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "'latest' or a checkpoint folder: continue with the same model, optimizer, scheduler, RNG, data."})
    seed: int = field(default=42, metadata={
        "help": "Seeds the model's initialization, the shuffle, the augmentations and dropout: the same seed gives "
                "the same run."})
    num_train_epochs: float = field(default=300, metadata={
        "help": "Epochs to train (paper: 300), unless max_steps > 0."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides num_train_epochs when > 0."})
    max_train_minutes: float = field(default=0, metadata={
        "help": "A time budget (> 0): the run times its first steps and one evaluation, trains as many optimizer "
                "steps as fit, with evaluations and the final save, in this many minutes (max_steps / "
                "num_train_epochs stay the upper bound), then plans again at every logging step from the recent "
                "steps' speed and the time left (the LR stays continuous); a deadline stops it when one more step, "
                "the final evaluation and the save would not fit. The measured steps fall in the LR warm-up (cosine "
                "needs warmup_steps >= 5). metrics.json's run.budget records the plans; a resumed run keeps them."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Training images per batch and process."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Evaluation images per batch and process."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Batches per optimizer step (the total batch: this x per_device_train_batch_size x processes)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Transformer and heads."})
    backbone_learning_rate: float = field(default=1e-5, metadata={"help": "Backbone (0 freezes it)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=0.1, metadata={"help": "Gradient clipping (paper: 0.1); 0 disables."})
    lr_scheduler_type: str = field(default="step", metadata={"help": "'step' (x0.1 at lr_drop_epochs) or 'cosine'."})
    lr_drop_epochs: float = field(default=200, metadata={
        "help": "The 'step' schedule: the epoch where the LR drops x0.1 (paper: 200)."})
    warmup_steps: int = field(default=0, metadata={
        "help": "Linear LR warm-up, in optimizer steps (at most half of the run)."})
    mixed_precision: str = field(default="no", metadata={
        "help": "'no', 'bf16' or 'fp16' (through Accelerate). On a CPU without native bf16 (AVX512_BF16 / AMX), bf16 "
                "is emulated and slower than fp32: the run warns and trains in fp32 (metrics.json: "
                "run.mixed_precision_used)."})
    ema_decay: float | None = field(default=None, metadata={
        "help": "An exponential moving average of the weights (RT-DETR, LW-DETR) with this decay, in [0, 1): "
                "evaluations, best/ and last/ use the average; checkpoints hold it. None or 0: off. RT-DETR: 0.9999 "
                "(hundreds of thousands of steps); ~0.993 for a run of ~1000 steps."})
    ema_warmup_steps: int = field(default=2000, metadata={
        "help": "The decay ramps up as ema_decay * (1 - exp(-step / ema_warmup_steps)) (RT-DETR: 2000); 0: none."})
    eval_every_epochs: float = field(default=1, metadata={"help": "Evaluate every N epochs (unless eval_steps > 0)."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps instead of every epoch (> 0)."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: at each evaluation)."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept (the newest)."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss terms every N optimizer steps."})
    report_to: str = field(default="tensorboard", metadata={
        "help": "Accelerate trackers: tensorboard, wandb, ..., 'all' or 'none' (tensorboard only if installed)."})
    num_prediction_images: int = field(default=8, metadata={"help": "Validation images in predictions.png."})
    push_to_hub: bool = field(default=False, metadata={
        "help": "Upload best/ (model, processor, model card, code) to the Hub at the end; the token is checked "
                "before training starts."})
    hub_model_id: str | None = field(default=None, metadata={
        "help": "The Hub repository to push to: owner/name, or name for your own namespace. Needed with push_to_hub."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    hub_token: str | None = field(default=None, metadata={
        "help": "A Hub token with write access. None: the HF_TOKEN environment variable, else the token saved by "
                "`hf auth login`."})


# --help's groups of the data and training flags: a group starts at its first field and runs to the next start
GROUP_STARTS = {
    "data_dir": "data: where it comes from", "train_scales": "data: sizes and augmentation",
    "check_policy": "data: checks and loading", "output_dir": "training: output and resuming",
    "seed": "training: length and time budget", "per_device_train_batch_size": "training: optimizer and schedule",
    "ema_decay": "training: average of the weights", "eval_every_epochs": "evaluation and checkpoints",
    "logging_steps": "logging", "push_to_hub": "Hub push",
}


def _grouped_fields(dataclass_type) -> list[tuple[str, list]]:
    groups, current = [], None
    for f in fields(dataclass_type):
        title = f.metadata.get("group") or GROUP_STARTS.get(f.name) or (current and current[0]) or "other"
        if current is None or title != current[0]:
            current = (title, [])
            groups.append(current)
        current[1].append(f)
    return groups


def string_to_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class _Factory:
    """The default of a list flag, made after parsing (its default_factory may import what --help does not need)."""

    def __repr__(self):
        return "its default"


FROM_FACTORY = _Factory()


def _add_flag(group, f, annotation) -> None:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kind = next(o for o in typing.get_args(annotation) if o is not type(None)) if union else annotation
    help_text = f.metadata.get("help") or ""
    if "group" not in f.metadata and f.default not in (MISSING, None):   # the model flags say theirs
        help_text += f" Default: {f.default}."
    kwargs = {"help": help_text.replace("%", "%%"), "dest": f.name}
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    kwargs["default"] = FROM_FACTORY if f.default_factory is not MISSING else f.default
    if kind is bool:
        kwargs.update(type=string_to_bool, nargs="?", const=True, metavar="BOOL")
    elif typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        kwargs.update(type=item, nargs="+", metavar=item.__name__.upper())
    else:
        kwargs.update(type=kind, metavar=kwargs.get("choices") and "{" + ",".join(kwargs["choices"]) + "}"
                      or kind.__name__.upper())
    group.add_argument(f"--{f.name}", **kwargs)
    hidden = {"help": argparse.SUPPRESS, "dest": f.name, "default": argparse.SUPPRESS}
    if "_" in f.name:   # --model-name-or-path, as transformers' HfArgumentParser accepts
        group.add_argument(f"--{f.name.replace('_', '-')}", **{**kwargs, **hidden})
    if kind is bool:    # --no_auxiliary_loss = --auxiliary_loss false
        group.add_argument(f"--no_{f.name}", action="store_false", **hidden)


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainArguments)


def build_parser() -> argparse.ArgumentParser:
    """The flags of the three dataclasses, grouped by purpose."""
    parser = argparse.ArgumentParser(
        prog="python -m training.train", usage="%(prog)s [--config FILE] [--FLAG VALUE ...]",
        description="Fine-tune or train DETR-family detectors with Accelerate. Every flag can also be a key of the "
                    "--config file; flags override the file. The model flags are DetrCustomConfig's fields (its "
                    "docstring has the details); left out, they take the preset's, the checkpoint's or the config's "
                    "value.", formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=32))
    parser.add_argument("--config", metavar="FILE", help="A yaml / json file of flag values (training/configs/ has "
                                                         "examples); flags given on the command line override it.")
    for dataclass_type in ARGUMENT_CLASSES:
        annotations = typing.get_type_hints(dataclass_type)
        for title, group_fields in _grouped_fields(dataclass_type):
            group = parser.add_argument_group(title)
            for f in group_fields:
                _add_flag(group, f, annotations[f.name])
    return parser


def parse_args(argv=None):
    """`--config FILE` (yaml or json) gives values, the other flags override them; unknown keys are errors."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        index = argv.index("--config")
        config_file = argv[index + 1]
        del argv[index:index + 2]
        with open(config_file) as f:
            values = yaml.safe_load(f) or {}
        known = {f.name for dc in ARGUMENT_CLASSES for f in fields(dc)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_file}: unknown key(s) {unknown}. See `python -m training.train --help`.")
        parser.set_defaults(**values)
    namespace = parser.parse_args(argv)
    parsed = []
    for dataclass_type in ARGUMENT_CLASSES:
        values = {f.name: getattr(namespace, f.name) for f in fields(dataclass_type)}
        parsed.append(dataclass_type(**{name: value for name, value in values.items() if value is not FROM_FACTORY}))
    for arguments in parsed:
        check_arguments(arguments)
    return parsed


def print_help_and_exit() -> None:
    build_parser().print_help()
    sys.exit(0)


# what a value must be beyond its type: a check and the words for it, by field name (fields of any dataclass here)
POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0")
RANGES = {
    "per_device_train_batch_size": POSITIVE, "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE, "logging_steps": POSITIVE, "num_train_epochs": POSITIVE,
    "eval_every_epochs": POSITIVE, "learning_rate": POSITIVE, "eval_size": POSITIVE, "max_size": POSITIVE,
    "d_model": POSITIVE, "decoder_layers": POSITIVE, "num_heads": POSITIVE, "ffn_dim": POSITIVE,
    "num_queries": POSITIVE, "max_train_samples": POSITIVE, "max_eval_samples": POSITIVE,
    "num_query_groups": POSITIVE, "one_to_many_repeats": POSITIVE,
    "max_steps": (lambda v: v == -1 or v > 0, "> 0, or -1 (train num_train_epochs)"),
    "backbone_learning_rate": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE, "eval_steps": NON_NEGATIVE, "save_steps": NON_NEGATIVE,
    "save_total_limit": NON_NEGATIVE, "max_train_minutes": NON_NEGATIVE, "num_workers": NON_NEGATIVE,
    "encoder_layers": NON_NEGATIVE, "eos_coefficient": NON_NEGATIVE, "lr_drop_epochs": NON_NEGATIVE,
    "num_prediction_images": NON_NEGATIVE, "ema_warmup_steps": NON_NEGATIVE, "num_denoising": NON_NEGATIVE,
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"), "nms_iou_threshold": (lambda v: 0 < v <= 1, "an IoU in (0, 1]"),
    "train_scales": (lambda v: len(v) > 0 and min(v) > 0, "a non-empty list of sizes > 0"),
    "crop_resize_scales": (lambda v: len(v) > 0 and min(v) > 0, "a non-empty list of sizes > 0"),
    "crop_size": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "two sizes [min, max], 0 < min <= max"),
}
CHOICES = {"lr_scheduler_type": ("step", "cosine"), "mixed_precision": ("no", "bf16", "fp16"),
           "check_policy": ("skip", "error"), "check_images": ("header", "decode", "auto"),
           "bbox_format": (None, "xywh", "xyxy")}


def _type_problem(value, annotation) -> str | None:
    """What is wrong with a value for a field's annotation (int, float, bool, str, list[int], X | None), or None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    if value is None:
        return None if type(None) in options else "a value (not null)"
    kind = next(o for o in options if o is not type(None))
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if kind is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if kind is str:
        return None if isinstance(value, str) else "a string"
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        if not isinstance(value, list) or any(_type_problem(v, item) for v in value):
            return f"a list of {'whole numbers' if item is int else item.__name__} (e.g. [480, 512])"
    return None


def check_arguments(arguments) -> None:
    """Every field of a parsed arguments dataclass has a value of its type and in its range: an impossible value
    (a negative or fractional batch size, max_steps 0, a list as learning_rate) fails here, naming the field, not
    deep in torch or silently."""
    annotations = typing.get_type_hints(type(arguments))
    for f in fields(arguments):
        value = getattr(arguments, f.name)
        expected = _type_problem(value, annotations[f.name])
        if expected is not None:
            raise ValueError(f"{f.name}={value!r}: must be {expected} (the config file or --{f.name}).")
        if f.name in RANGES and value is not None:
            check, words = RANGES[f.name]
            if not check(value):
                raise ValueError(f"{f.name}={value!r}: must be {words} (the config file or --{f.name}).")
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise ValueError(f"{f.name}={value!r}: must be one of {[c for c in CHOICES[f.name] if c]}.")
    if isinstance(arguments, ModelArguments) and arguments.num_heads:   # the config checks the per-part fields
        d_model = arguments.d_model or PRESETS.get(arguments.preset, {}).get("d_model", CONFIG_DEFAULTS["d_model"])
        if d_model % arguments.num_heads:
            raise ValueError(f"num_heads={arguments.num_heads}: d_model={d_model} must be divisible by num_heads "
                             "(each attention head takes d_model / num_heads channels).")
