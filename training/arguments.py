"""The training script's arguments: three dataclasses parsed by transformers' HfArgumentParser.

A yaml/json file (`--config FILE`) gives the values, the command line overrides them, `--help` lists them all;
unknown keys in the file are errors.
"""
import sys
import types
import typing
from dataclasses import dataclass, field, fields

import yaml
from transformers import HfArgumentParser

from .transforms import PAPER_CROP_RESIZE_SCALES, PAPER_CROP_SIZE, PAPER_SCALES


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Start from this checkpoint: our folder, a transformers DETR folder/Hub id (e.g. "
                "facebook/detr-resnet-50) or a converted original. Its class head is replaced to fit the dataset's "
                "classes. None: a new model from the fields below."})
    backbone: str = field(default="resnet50", metadata={"help": "timm backbone (new models only)."})
    use_pretrained_backbone: bool = field(default=False, metadata={
        "help": "Load timm's ImageNet weights for a new model (needs the Hub)."})
    freeze_batch_norm: bool = field(default=True, metadata={
        "help": "Frozen BatchNorm in the backbone (the original). False to train a backbone from scratch."})
    freeze_backbone_stem: bool = field(default=True, metadata={"help": "Freeze stem + first backbone stage."})
    dilation: bool = field(default=False, metadata={"help": "DC5: dilation instead of stride in the last stage."})
    d_model: int = field(default=256, metadata={"help": "Transformer width."})
    encoder_layers: int = field(default=6, metadata={"help": "Encoder layers."})
    decoder_layers: int = field(default=6, metadata={"help": "Decoder layers."})
    num_heads: int = field(default=8, metadata={"help": "Attention heads (encoder and decoder)."})
    ffn_dim: int = field(default=2048, metadata={"help": "Feed-forward width (encoder and decoder)."})
    num_queries: int = field(default=100, metadata={"help": "Object queries: the most detections per image."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout in the transformer."})
    position_embedding_type: str = field(default="sine", metadata={
        "help": "'sine' (DETR's, normalized), 'learned' or 'sine_absolute' (RT-DETR's AIFI: unnormalized cell "
                "indices)."})
    auxiliary_loss: bool = field(default=True, metadata={"help": "Loss on every decoder layer (the original)."})
    eos_coefficient: float = field(default=0.1, metadata={"help": "Class weight of 'no object'."})
    # the class term (configuration_detr_custom.DetrCustomConfig's fields of the same names); None: the checkpoint's
    # value with model_name_or_path, the config's default for a new model
    classification_loss: str | None = field(default=None, metadata={
        "help": "'cross_entropy' (DETR: softmax + 'no object'), 'focal' (Deformable DETR: per-class sigmoid focal "
                "loss) or 'varifocal' (RT-DETR: the matched box's IoU as class target). A sigmoid one on a softmax "
                "checkpoint gives it a new class head. None: the checkpoint's (new models: cross_entropy).",
        "choices": ["cross_entropy", "focal", "varifocal"]})
    focal_alpha: float | None = field(default=None, metadata={"help": "Focal loss and matching cost alpha (0.25)."})
    focal_gamma: float | None = field(default=None, metadata={"help": "Focal and varifocal gamma (2)."})
    varifocal_alpha: float | None = field(default=None, metadata={"help": "Varifocal weight of negatives (0.75)."})
    class_loss_coefficient: float | None = field(default=None, metadata={
        "help": "Weight of the class term (1; Deformable DETR uses 2 with focal loss)."})
    class_cost: float | None = field(default=None, metadata={
        "help": "Matching cost weight of the class term (1; Deformable DETR uses 2 with focal loss)."})
    backbone_weights: str | None = field(default=None, metadata={
        "help": "A local .pth / .safetensors file of pretrained backbone weights (new models only; no Hub): timm's "
                "keys, torchvision's ResNet or MobileNetV2 (mapped). Loaded strictly; replaces "
                "use_pretrained_backbone. `make weights` fetches ImageNet MobileNetV2 weights (backbone "
                "mobilenetv2_100)."})
    backbone_weights_sha256: str | None = field(default=None, metadata={
        "help": "The backbone_weights file's expected sha256, checked before loading."})
    num_query_groups: int | None = field(default=None, metadata={
        "help": "Group DETR: K groups of num_queries queries at training, each matched to the targets on its own "
                "(LW-DETR / RF-DETR use 13); inference runs one group; 1 = off. With model_name_or_path, groups the "
                "checkpoint lacks start from its queries. None: the checkpoint's (new models: 1)."})
    # the deformable variant (DetrCustomConfig's fields of the same names); None: the checkpoint's / the default
    encoder_type: str | None = field(default=None, metadata={
        "help": "'detr' (default), 'hybrid' (with decoder_type deformable: RT-DETR's hybrid encoder, attention on "
                "the coarsest level + cross-scale convolutional fusion) or 'deformable' (with decoder_type "
                "deformable: Deformable DETR's encoder, deformable attention over every level). None: the "
                "checkpoint's (new models: detr).",
        "choices": ["detr", "hybrid", "deformable"]})
    hidden_expansion: float | None = field(default=None, metadata={
        "help": "encoder_type hybrid: width of the fusion blocks as a multiple of d_model (1.0)."})
    decoder_type: str | None = field(default=None, metadata={
        "help": "'detr' (default) or 'deformable' (Deformable DETR's decoder with box refinement on multi-scale "
                "features; use a sigmoid classification_loss with it). None: the checkpoint's (new models: detr).",
        "choices": ["detr", "deformable"]})
    num_feature_levels: int | None = field(default=None, metadata={
        "help": "Feature levels the deformable decoder reads (4: ResNet strides 8-32 + one extra). None: 1."})
    decoder_n_points: int | None = field(default=None, metadata={
        "help": "Deformable decoder: sampling points per head and level (4)."})
    encoder_n_points: int | None = field(default=None, metadata={
        "help": "encoder_type deformable: sampling points per head and level (4)."})
    two_stage: bool | None = field(default=None, metadata={
        "help": "Deformable decoder: query selection, the queries start at the encoder's top num_queries proposals "
                "(two-stage Deformable DETR, RT-DETR) instead of learned boxes. None: the checkpoint's (new: off)."})
    learn_initial_query: bool | None = field(default=None, metadata={
        "help": "With two_stage: learned content queries instead of the selected encoder features (RT-DETR's "
                "option). None: the checkpoint's (new: off)."})
    num_denoising: int | None = field(default=None, metadata={
        "help": "Deformable decoder with a sigmoid classification_loss: about this many noised ground-truth queries "
                "at training (contrastive denoising, DINO / RT-DETR, which uses 100); 0 = off. None: the "
                "checkpoint's (new: 0)."})
    label_noise_ratio: float | None = field(default=None, metadata={
        "help": "Denoising: labels flipped with probability label_noise_ratio / 2 (0.5)."})
    box_noise_scale: float | None = field(default=None, metadata={
        "help": "Denoising: box noise in half box sizes (1.0)."})
    # RT-DETR's exact layout (what its checkpoints need); None: the checkpoint's / the default
    encoder_activation_function: str | None = field(default=None, metadata={
        "help": "The encoder FFN's activation if not activation_function's (RT-DETR's AIFI: gelu).",
        "choices": ["relu", "gelu"]})
    projection_norm: str | None = field(default=None, metadata={
        "help": "After each level's 1x1 projection: 'group' (GroupNorm, Deformable DETR's; default) or 'batch' "
                "(BatchNorm, RT-DETR's).", "choices": ["group", "batch"]})
    decoder_input_proj: bool | None = field(default=None, metadata={
        "help": "encoder_type hybrid: RT-DETR's second per-level 1x1 conv + BatchNorm between encoder and decoder."})
    backbone_first_block_shortcut: bool | None = field(default=None, metadata={
        "help": "A 1x1 conv shortcut on the first block of a basic-block timm ResNet (resnet18d / resnet34d = "
                "RT-DETR's R18vd / R34vd)."})


@dataclass
class DataArguments:
    data_dir: str | None = field(default=None, metadata={
        "help": "COCO 2017 layout: DATA_DIR/annotations/instances_{train,val}2017.json, DATA_DIR/{train,val}2017/."})
    train_annotation_file: str | None = field(default=None, metadata={"help": "Any COCO json (with train_image_dir)."})
    train_image_dir: str | None = None
    val_annotation_file: str | None = field(default=None, metadata={"help": "Any COCO json (with val_image_dir)."})
    val_image_dir: str | None = None
    dataset_name: str | None = field(default=None, metadata={
        "help": "A Hub dataset (or a save_to_disk folder) with image + objects{bbox, category, area, id}."})
    bbox_format: str | None = field(default=None, metadata={
        "help": "Hub datasets only, required there: 'xywh' or 'xyxy'."})
    bbox_normalized: bool = field(default=False, metadata={"help": "Hub datasets: boxes are in [0, 1]."})
    train_split: str = "train"
    val_split: str = "validation"
    write_demo_data: bool = field(default=False, metadata={
        "help": "Write the embedded synthetic dataset into data_dir first (the demo)."})
    train_scales: list[int] = field(default_factory=lambda: list(PAPER_SCALES), metadata={
        "help": "Shortest-edge sizes for multi-scale training (paper: 480..800 by 32)."})
    eval_size: int = field(default=800, metadata={"help": "Shortest edge at evaluation and in the saved processor."})
    max_size: int = field(default=1333, metadata={"help": "Longest edge limit."})
    random_crop: bool = field(default=True, metadata={
        "help": "The paper's random choice between resize and resize + random crop + resize; False: resize only."})
    crop_resize_scales: list[int] = field(default_factory=lambda: list(PAPER_CROP_RESIZE_SCALES))
    crop_size: list[int] = field(default_factory=lambda: list(PAPER_CROP_SIZE), metadata={
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
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/run", metadata={"help": "Checkpoints, metrics, pictures, best/, last/."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Reuse an output_dir that holds a run."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "'latest' or a checkpoint folder: continue with the same model, optimizer, scheduler, RNG, data."})
    seed: int = 42
    num_train_epochs: float = 300
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides num_train_epochs when > 0."})
    max_train_minutes: float = field(default=0, metadata={
        "help": "A time budget (> 0): the run times its first steps and one evaluation, then trains as many optimizer "
                "steps as fit, with evaluations and the final save, in this many minutes (max_steps / "
                "num_train_epochs stay the upper bound), and sizes the LR schedule for them. The measured steps fall "
                "in the LR warm-up (cosine needs warmup_steps >= 5). metrics.json's run.budget records the decision; "
                "a resumed run keeps it."})
    per_device_train_batch_size: int = 2
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = field(default=1e-4, metadata={"help": "Transformer and heads."})
    backbone_learning_rate: float = field(default=1e-5, metadata={"help": "Backbone (0 freezes it)."})
    weight_decay: float = 1e-4
    max_grad_norm: float = field(default=0.1, metadata={"help": "Gradient clipping (paper: 0.1); 0 disables."})
    lr_scheduler_type: str = field(default="step", metadata={"help": "'step' (x0.1 at lr_drop_epochs) or 'cosine'."})
    lr_drop_epochs: float = 200
    warmup_steps: int = 0
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
    eval_every_epochs: float = 1
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps instead of every epoch (> 0)."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: at each evaluation)."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept (the newest)."})
    logging_steps: int = 10
    report_to: str = field(default="tensorboard", metadata={
        "help": "Accelerate trackers: tensorboard, wandb, ..., 'all' or 'none' (tensorboard only if installed)."})
    num_prediction_images: int = field(default=8, metadata={"help": "Validation images in predictions.png."})
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool = False
    hub_token: str | None = None


def parse_args(argv=None):
    """`--config FILE` (yaml or json) gives values, the other flags override them; unknown keys are errors."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        index = argv.index("--config")
        config_file = argv[index + 1]
        del argv[index:index + 2]
        with open(config_file) as f:
            values = yaml.safe_load(f) or {}
        known = {f.name for dc in (ModelArguments, DataArguments, TrainArguments) for f in fields(dc)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config_file}: unknown key(s) {unknown}. See `python -m training.train --help`.")
        parser.set_defaults(**values)
    parsed = parser.parse_args_into_dataclasses(args=argv)
    for arguments in parsed:
        check_arguments(arguments)
    return parsed


# what a value must be beyond its type: a check and the words for it, by field name (fields of any dataclass here)
POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0")
RANGES = {
    "per_device_train_batch_size": POSITIVE, "per_device_eval_batch_size": POSITIVE,
    "gradient_accumulation_steps": POSITIVE, "logging_steps": POSITIVE, "num_train_epochs": POSITIVE,
    "eval_every_epochs": POSITIVE, "learning_rate": POSITIVE, "eval_size": POSITIVE, "max_size": POSITIVE,
    "d_model": POSITIVE, "decoder_layers": POSITIVE, "num_heads": POSITIVE, "ffn_dim": POSITIVE,
    "num_queries": POSITIVE, "max_train_samples": POSITIVE, "max_eval_samples": POSITIVE,
    "num_query_groups": POSITIVE,
    "max_steps": (lambda v: v == -1 or v > 0, "> 0, or -1 (train num_train_epochs)"),
    "backbone_learning_rate": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
    "warmup_steps": NON_NEGATIVE, "eval_steps": NON_NEGATIVE, "save_steps": NON_NEGATIVE,
    "save_total_limit": NON_NEGATIVE, "max_train_minutes": NON_NEGATIVE, "num_workers": NON_NEGATIVE,
    "encoder_layers": NON_NEGATIVE, "eos_coefficient": NON_NEGATIVE, "lr_drop_epochs": NON_NEGATIVE,
    "num_prediction_images": NON_NEGATIVE, "ema_warmup_steps": NON_NEGATIVE, "num_denoising": NON_NEGATIVE,
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train_scales": (lambda v: len(v) > 0 and min(v) > 0, "a non-empty list of sizes > 0"),
    "crop_resize_scales": (lambda v: len(v) > 0 and min(v) > 0, "a non-empty list of sizes > 0"),
    "crop_size": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "two sizes [min, max], 0 < min <= max"),
}
CHOICES = {"lr_scheduler_type": ("step", "cosine"), "mixed_precision": ("no", "bf16", "fp16"),
           "check_policy": ("skip", "error"), "check_images": ("header", "decode", "auto"),
           "bbox_format": (None, "xywh", "xyxy")}


def _type_problem(value, annotation) -> str | None:
    """What is wrong with a value for a field's annotation (int, float, bool, str, list[int], X | None), or None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)   # HfArgumentParser rewrites X | None
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
    annotations = typing.get_type_hints(type(arguments))   # the declared types (HfArgumentParser edits f.type)
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
    if getattr(arguments, "d_model", None) and arguments.d_model % arguments.num_heads:
        raise ValueError(f"num_heads={arguments.num_heads}: d_model={arguments.d_model} must be divisible by "
                         "num_heads (each attention head takes d_model / num_heads channels).")
