"""Building a run: the Accelerator (precision, logging once, output checks), the data and its check, the model,
the loaders with their seeded streams, the optimizer and the LR schedule, the time budget, the weights' average
(--ema_decay). `build()` returns them in a `TrainingSetup`; train.py runs the loop over it."""
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.fast_paths import cpu_bf16_support

from .arguments import (CONFIG_DEFAULTS, SHORTCUTS, TRAINING_DEFAULTS, DataArguments, ModelArguments,
                        TrainArguments)
from .budget import TimeBudget
from .checkpoints import check_output_dir, find_checkpoint
from .data import (Categories, DetrCollator, check_dataset, check_same_categories, get_categories, get_split,
                   load_coco, load_hub_detection)
from .data.check import warn_if_small
from .ema import WeightEma, check_ema_arguments
from .transforms import Compose, RandomHorizontalFlip, RandomResize, make_detr_transforms, with_augmentations

logger = get_logger("training.train")


def load_data(data_args: DataArguments, accelerator: Accelerator):
    if data_args.write_demo_data and not (data_args.dataset_name or data_args.train_annotation_file):
        from .sample_data import write_sample_dataset

        with accelerator.main_process_first():
            if accelerator.is_main_process:
                write_sample_dataset(data_args.data_dir)
    with accelerator.main_process_first():   # the first process builds the datasets cache, the others read it
        if data_args.dataset_name:
            if data_args.bbox_format is None:
                raise ValueError("--bbox_format ('xywh' or 'xyxy') is required with --dataset_name.")
            train, val = (load_hub_detection(data_args.dataset_name, split, bbox_format=data_args.bbox_format,
                                             bbox_normalized=data_args.bbox_normalized)
                          for split in (data_args.train_split, data_args.val_split))
            # the splits read (cppe-5 validates on 'test'), for the messages and the run's record
            data_args.train_split = get_split(train) or data_args.train_split
            data_args.val_split = get_split(val) or data_args.val_split
        elif data_args.train_annotation_file:
            train = load_coco(annotation_file=data_args.train_annotation_file, image_dir=data_args.train_image_dir)
            val = load_coco(annotation_file=data_args.val_annotation_file, image_dir=data_args.val_image_dir)
        elif data_args.data_dir:
            train, val = load_coco(data_args.data_dir, "train"), load_coco(data_args.data_dir, "val")
        else:
            raise ValueError("Give --data_dir (COCO layout), --train/val_annotation_file + image dirs, "
                             "or --dataset_name.")
    categories = get_categories(train)
    sources = data_sources(data_args)
    check_same_categories(categories, get_categories(val), train_source=sources[0], val_source=sources[1])
    if data_args.max_train_samples:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples:
        val = val.select(range(min(data_args.max_eval_samples, len(val))))
    return train, val, categories


def data_sources(data_args: DataArguments) -> tuple[str, str]:
    """How the training and validation sets are named in messages: their files, or the dataset and split."""
    if data_args.dataset_name:
        return (f"{data_args.dataset_name} split {data_args.train_split!r}",
                f"{data_args.dataset_name} split {data_args.val_split!r}")
    if data_args.train_annotation_file:
        return data_args.train_annotation_file, str(data_args.val_annotation_file)
    root = Path(data_args.data_dir or ".") / "annotations"
    return str(root / "instances_train2017.json"), str(root / "instances_val2017.json")


# the processor settings that say what pixel values a checkpoint was trained on (the sizes come from the data args)
PIXEL_SCALING = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")


def checkpoint_pixel_scaling(model_name_or_path: str | None) -> dict:
    """The checkpoint's pixel scaling, read from its preprocessor_config.json, so that fine-tuning feeds the pixel
    values it was trained on: RT-DETR checkpoints take [0, 1] pixels without ImageNet normalization, DETR's are
    normalized. {} (our defaults: ImageNet mean / std) for a new model or a checkpoint without one."""
    if not model_name_or_path:
        return {}
    try:
        saved = DetrCustomImageProcessor.from_pretrained(model_name_or_path)
    except (OSError, ValueError):   # no preprocessor_config.json (or not reachable offline): our defaults
        return {}
    return {name: getattr(saved, name) for name in PIXEL_SCALING}


# ModelArguments flags (-> config fields) that a checkpoint started from with model_name_or_path takes when given:
# head sizes and training behaviour; num_queries re-initializes the query table (and the deformable reference boxes),
# the rest changes no weight. Every other given config flag is applied too (another decoder, other levels: new weights
# start from random values, and warn_reinitialized names them), except the two lists below.
APPLIED_TO_CHECKPOINT = {"num_queries": ("num_queries",), "dropout": SHORTCUTS["dropout"],
                         "eos_coefficient": ("eos_coefficient",), "auxiliary_loss": ("auxiliary_loss",),
                         "freeze_batch_norm": ("freeze_batch_norm",),
                         "freeze_backbone_stem": ("freeze_backbone_stem",), "dilation": ("dilation",)}
# ModelArguments flags that are the checkpoint's architecture (-> its config field): another value is refused
FIXED_BY_CHECKPOINT = {"backbone": "backbone", "d_model": "d_model", "encoder_layers": "encoder_layers",
                       "decoder_layers": "decoder_layers", "num_heads": "encoder_attention_heads",
                       "ffn_dim": "encoder_ffn_dim", "position_embedding_type": "position_embedding_type",
                       "encoder_attention_heads": "encoder_attention_heads",
                       "decoder_attention_heads": "decoder_attention_heads", "encoder_ffn_dim": "encoder_ffn_dim",
                       "decoder_ffn_dim": "decoder_ffn_dim", "num_channels": "num_channels"}
# new models only: with model_name_or_path the checkpoint's weights are loaded instead
NEW_MODEL_ONLY = ("backbone_weights", "backbone_weights_sha256", "use_pretrained_backbone", "preset")


def given_model_arguments(model_args: ModelArguments) -> dict:
    """The ModelArguments flags given (in the config file or on the command line; None = not given), except
    use_pretrained_backbone=False, the training script's default."""
    return {f.name: getattr(model_args, f.name) for f in fields(ModelArguments)
            if getattr(model_args, f.name) is not None
            and getattr(model_args, f.name) != TRAINING_DEFAULTS.get(f.name, object())}


def config_values(given: dict) -> dict:
    """The config fields that the given flags set: each field given itself, then the shortcuts (--num_heads,
    --ffn_dim, --dropout) for the fields not given."""
    values = {name: value for name, value in given.items() if name in CONFIG_DEFAULTS}
    for shortcut, names in SHORTCUTS.items():
        if shortcut in given:
            values.update({name: given[shortcut] for name in names if name not in given})
    return values


def warn_reinitialized(model_name_or_path: str, loading_info: dict, options: dict) -> None:
    """Says which weights a checkpoint did not provide (beyond the class head, which the dataset sizes, and query
    groups, which start from the checkpoint's first group) and the given options that changed the architecture."""
    mismatched = [entry[0] if isinstance(entry, (tuple, list)) else entry for entry in loading_info["mismatched_keys"]]
    new = sorted(key for key in set(loading_info["missing_keys"]) | set(mismatched)
                 if "class_embed" not in key and "group" not in key)
    if new:
        given = ", ".join(f"{name}={value!r}" for name, value in options.items()) or "none"
        logger.warning("%s: %d weight tensors are not in the checkpoint (or have other shapes) and start from random "
                       "values, e.g. %s. Options given that shape the model: %s. Drop those that differ from the "
                       "checkpoint's to fine-tune all of its weights.", model_name_or_path, len(new),
                       ", ".join(new[:4]), given)


def new_model_config(model_args: ModelArguments, **labels) -> DetrCustomConfig:
    """The config of a new model: the preset's values (--preset; none: the config's defaults), the given flags on
    top."""
    values = config_values(given_model_arguments(model_args))
    return DetrCustomConfig.from_preset(model_args.preset or "detr", **{**TRAINING_DEFAULTS, **values, **labels})


def build_model(model_args: ModelArguments, categories) -> DetrCustomForObjectDetection:
    """A new model from the preset and the given config flags, or the checkpoint of model_name_or_path with them
    applied (architecture flags that differ from it are refused). Either way the config's rules hold, and a given
    flag that the model's variant ignores is refused or warned about (DetrCustomConfig's IGNORED_FIELDS)."""
    labels = {"num_labels": len(categories.names), "id2label": categories.id2label, "label2id": categories.label2id}
    if not model_args.model_name_or_path:
        return DetrCustomForObjectDetection(new_model_config(model_args, **labels))
    given = given_model_arguments(model_args)
    values = config_values(given)
    refused = [name for name in NEW_MODEL_ONLY if name in given]
    if refused:
        raise ValueError(f"{refused} apply to new models only: with --model_name_or_path "
                         f"{model_args.model_name_or_path} the checkpoint's weights are loaded. Drop them, or "
                         "drop --model_name_or_path to build a new model.")
    fixed = {FIXED_BY_CHECKPOINT[name] for name in given if name in FIXED_BY_CHECKPOINT}
    options = {name: value for name, value in values.items() if name not in fixed}
    model, loading_info = DetrCustomForObjectDetection.from_pretrained(
        model_args.model_name_or_path, ignore_mismatched_sizes=True, output_loading_info=True, **labels, **options)
    warn_reinitialized(model_args.model_name_or_path, loading_info, options)
    differing = [f"{name}={given[name]!r} (the checkpoint's {config_name}: "
                 f"{getattr(model.config, config_name, None)!r})"
                 for name, config_name in FIXED_BY_CHECKPOINT.items()
                 if name in given and given[name] != getattr(model.config, config_name, None)]
    if differing:
        raise ValueError(f"{model_args.model_name_or_path} fixes the architecture, but {', '.join(differing)} "
                         "differ: these can not change on a checkpoint. Drop them (the checkpoint's values are "
                         "used), or drop --model_name_or_path to train a new model with them.")
    model.config.check_values(user_set=set(options))   # the options were set on the loaded config
    if options:
        logger.info("%s: applied to the checkpoint's config: %s", model_args.model_name_or_path,
                    ", ".join(f"{name}={value!r}" for name, value in options.items()))
    logger.info("%s: class head sized for the dataset's %d classes (re-initialized if the checkpoint had "
                "another count; the rest of the model is loaded)", model_args.model_name_or_path,
                labels["num_labels"])
    return model


def build_optimizer(model, args: TrainArguments) -> torch.optim.Optimizer:
    backbone = [p for n, p in model.named_parameters() if p.requires_grad and ".backbone." in f".{n}"]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and ".backbone." not in f".{n}"]
    groups = [{"params": rest, "lr": args.learning_rate}]
    if args.backbone_learning_rate > 0:
        groups.append({"params": backbone, "lr": args.backbone_learning_rate})
    else:
        for p in backbone:
            p.requires_grad_(False)
    return torch.optim.AdamW(groups, weight_decay=args.weight_decay)


def build_scheduler(optimizer, args: TrainArguments, *, steps_per_epoch: int, total_steps: Callable[[], int],
                    budget: TimeBudget | None = None):
    """LR factor of the optimizer step (the scheduler steps once per optimizer step, see make_accelerator).
    total_steps is read when needed; with a time budget, the cosine follows the budget's plan (sized after the first
    warm-up steps, then planned again as the run goes, see budget.py)."""
    if args.lr_scheduler_type == "cosine":
        def factor(step):   # matches transformers' get_cosine_schedule_with_warmup
            if step < args.warmup_steps:
                return float(step) / float(max(1, args.warmup_steps))
            if budget is not None:
                progress = budget.cosine_progress(step, args.warmup_steps)
            else:
                progress = float(step - args.warmup_steps) / float(max(1, total_steps() - args.warmup_steps))
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if args.lr_scheduler_type != "step":
        raise ValueError(f"lr_scheduler_type={args.lr_scheduler_type!r}: use 'step' or 'cosine'.")
    drop_step = int(args.lr_drop_epochs * steps_per_epoch)

    def factor(step):
        warmup = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
        return warmup * (0.1 if step >= drop_step else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_report_to(report_to: str) -> str | None:
    """Accelerate's `log_with`: None for 'none', and for 'tensorboard' where it is not installed."""
    if report_to == "none":
        return None
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return None
    return report_to


def build_loaders(train_dataset, val_dataset, *, processor, categories: Categories, data_args: DataArguments,
                  args: TrainArguments, rank: int) -> tuple[DataLoader, DataLoader, torch.Generator]:
    """The train loader (augmented, shuffled by its own generator) and the validation loader. The augmentations
    follow (seed, rank, epoch): each process draws its own; the shuffle is accelerate's, the same on all."""
    if data_args.random_crop:
        train_transforms = make_detr_transforms("train", data_args.train_scales, data_args.max_size,
                                                data_args.crop_resize_scales, data_args.crop_size)
    else:
        train_transforms = Compose([RandomHorizontalFlip(), RandomResize(data_args.train_scales, data_args.max_size)])
    train_transforms = with_augmentations(   # the RT-DETR / YOLO augmentations the config turns on (none by default)
        train_transforms, photometric_distort=data_args.photometric_distort, zoom_out=data_args.zoom_out,
        zoom_out_max=data_args.zoom_out_max, iou_crop=data_args.iou_crop, scale_jitter=data_args.scale_jitter,
        mosaic=data_args.mosaic, vertical_flip=data_args.vertical_flip, rotate90=data_args.rotate90,
        max_size=data_args.max_size)
    loader_kwargs = {"num_workers": data_args.num_workers, "persistent_workers": data_args.num_workers > 0}
    # the loader's own generator (reseeded each epoch) gives worker seeds, so starting an iterator never draws
    # from the global RNG: a run resumed mid-epoch sees the same augmentation and dropout streams
    loader_generator = torch.Generator()
    train_loader = DataLoader(train_dataset, batch_size=args.per_device_train_batch_size, shuffle=True,
                              collate_fn=DetrCollator(processor, categories.category_id_to_label, train_transforms,
                                                      seed=args.seed, rank=rank),
                              drop_last=False, generator=loader_generator, **loader_kwargs)
    # its own generator too: an evaluation then draws nothing from torch's RNG, so a run that evaluated (at its
    # last step, or to time a budget) continues with the dropout stream of one that did not
    val_loader = DataLoader(val_dataset, batch_size=args.per_device_eval_batch_size,
                            collate_fn=DetrCollator(processor, categories.category_id_to_label),
                            generator=torch.Generator(), **loader_kwargs)
    return train_loader, val_loader, loader_generator


def fit_warmup(warmup_steps: int, total_steps: int) -> int:
    """The LR warm-up, at most half of the run's steps (the upper bound): a 100-step warm-up in a 30-step run would
    end the run before the learning rate reaches its value. Logged when shortened."""
    fitted = min(warmup_steps, total_steps // 2)
    if fitted < warmup_steps:
        logger.warning("warmup_steps=%d does not fit a run of %d steps: the warm-up takes its first %d steps (half)",
                       warmup_steps, total_steps, fitted)
    return fitted


def budget_for_run(budget: TimeBudget, args: TrainArguments, total_steps: int) -> TimeBudget | None:
    """The time budget, or None where the run is too short to time (it would end before the budget's timed steps,
    or its fitted cosine warm-up is shorter than them): max_steps is then the limit and the budget is not used."""
    too_short = total_steps <= budget.measure_steps or (
        args.lr_scheduler_type == "cosine" and args.warmup_steps < budget.measure_steps and total_steps < 10)
    if not too_short:
        return budget
    logger.info("max_train_minutes=%g not used: the run's %d steps (max_steps) end before the budget could time its "
                "%d steps, so max_steps is the limit", budget.minutes, total_steps, budget.measure_steps)
    return None


@dataclass
class TrainingSetup:
    """What `build` makes: the prepared model, optimizer, scheduler and loaders, and what the loop reads besides."""

    args: TrainArguments
    accelerator: Accelerator
    model: torch.nn.Module                 # prepared: wrapped for several processes
    processor: DetrCustomImageProcessor
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: DataLoader
    val_loader: DataLoader
    loader_generator: torch.Generator      # the train loader's: reseeded at each epoch
    train_dataset: datasets.Dataset
    val_dataset: datasets.Dataset
    categories: Categories
    steps_per_epoch: int                   # optimizer steps in an epoch (all processes together)
    total_steps: int
    num_epochs: int
    eval_every: int                        # optimizer steps between evaluations
    save_every: int                        # optimizer steps between checkpoints
    checkpoint: Path | None                # the one this run resumes from
    started: float                         # time.time() when the run began loading data
    budget: TimeBudget | None = None       # --max_train_minutes: sizes total_steps after the first steps
    ema: WeightEma | None = None           # --ema_decay: the average that is evaluated and saved


def resolve_mixed_precision(requested: str, *, cuda: bool) -> tuple[str, str | None]:
    """(the precision to run, a warning or None): bf16 on a CPU that only emulates it runs fp32 instead."""
    if requested != "bf16" or cuda:
        return requested, None
    native, why = cpu_bf16_support()
    if native:
        return requested, None
    return "no", f"--mixed_precision bf16 requested, but {why}: training in fp32 instead."


def make_accelerator(args: TrainArguments, *, log_with: str | None) -> Accelerator:
    """The Accelerator, after the checks that must fail before any training: the Hub token, the output_dir."""
    # several processes without CUDA (`accelerate launch --multi_gpu` / torchrun on CPU machines): gloo on CPU
    several_cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    mixed_precision, precision_warning = resolve_mixed_precision(
        args.mixed_precision, cuda=torch.cuda.is_available() and not several_cpu_processes)
    accelerator = Accelerator(
        cpu=several_cpu_processes,
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=mixed_precision,
        log_with=log_with, project_dir=args.output_dir,
        # train_step steps the scheduler once per optimizer step; prepared with the optimizer, accelerate would
        # step it num_processes times per step (a schedule sized in optimizer steps would run N times too fast)
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    if not accelerator.is_main_process:   # each message once; errors (exceptions) still surface from any rank
        logging.getLogger().setLevel(logging.ERROR)
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        warnings.filterwarnings("ignore")
    if precision_warning:
        logger.warning(precision_warning)
    if args.push_to_hub:   # fail now, not after hours of training
        from hub_cards import check_hub_token

        if not args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/detr-demo).")
        check_hub_token(args.hub_token)
    if accelerator.is_main_process:
        check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir,
                         resuming=bool(args.resume_from_checkpoint),
                         logging_dir=accelerator.logging_dir)
    accelerator.wait_for_everyone()
    return accelerator


def build(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments) -> TrainingSetup:
    """Accelerator, data, model, loaders, optimizer and scheduler. Keep the order (the seed, the model's
    initialization, the loaders, prepare): the random streams follow it, so a given seed gives the same run."""
    check_ema_arguments(args.ema_decay, args.ema_warmup_steps)
    report_to = resolve_report_to(args.report_to)
    accelerator = make_accelerator(args, log_with=report_to)
    set_seed(args.seed)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)
    started = time.time()
    budget = None
    if args.max_train_minutes > 0:   # its clock starts now (the window is set again once the warm-up is fitted)
        budget = TimeBudget(args.max_train_minutes, timed_steps=TimeBudget.timing_window(args.warmup_steps))

    train_dataset, val_dataset, categories = load_data(data_args, accelerator)
    model = build_model(model_args, categories)
    with accelerator.main_process_first():
        check = {"num_queries": model.config.num_queries, "policy": data_args.check_policy,
                 "check_images": data_args.check_images}
        train_source, val_source = data_sources(data_args)
        train_dataset, train_report = check_dataset(train_dataset, **check, source=train_source)
        val_dataset, val_report = check_dataset(val_dataset, **check, source=val_source)
    if accelerator.is_main_process:
        logger.info("train data check: %s\nval data check: %s", train_report, val_report)
        warn_if_small(len(train_dataset))
    # images stay undecoded: the collate reads the stored pixels, on which COCO boxes are drawn
    train_dataset = train_dataset.cast_column("image", datasets.Image(decode=False))
    val_dataset = val_dataset.cast_column("image", datasets.Image(decode=False))
    scaling = checkpoint_pixel_scaling(model_args.model_name_or_path)
    if scaling:
        logger.info("pixel scaling from %s's preprocessor_config.json: %s", model_args.model_name_or_path, scaling)
    processor = DetrCustomImageProcessor(size={"shortest_edge": data_args.eval_size,
                                               "longest_edge": data_args.max_size},
                                         nms_iou_threshold=data_args.nms_iou_threshold, **scaling)
    train_loader, val_loader, loader_generator = build_loaders(
        train_dataset, val_dataset, processor=processor, categories=categories, data_args=data_args, args=args,
        rank=accelerator.process_index)

    optimizer = build_optimizer(model, args)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    eval_every = args.eval_steps if args.eval_steps > 0 else max(1, int(args.eval_every_epochs * steps_per_epoch))
    args.warmup_steps = fit_warmup(args.warmup_steps, total_steps)
    if budget is not None:
        budget.timed_steps = TimeBudget.timing_window(args.warmup_steps)
        budget = budget_for_run(budget, args, total_steps)
    if budget is not None:
        budget.set_upper_bound(total_steps)
        if args.lr_scheduler_type == "cosine" and args.warmup_steps < budget.measure_steps:
            raise ValueError(f"max_train_minutes with the cosine schedule needs warmup_steps >= "
                             f"{budget.measure_steps}: the steps timed before sizing must not depend on the total.")
        accelerator.register_for_checkpointing(budget)   # a resumed run keeps the sized schedule
    scheduler = build_scheduler(optimizer, args, steps_per_epoch=steps_per_epoch,
                                total_steps=lambda: total_steps, budget=budget)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)
    # the model's initialization and the shuffle (SeedableRandomSampler took the seed in prepare) are the same on
    # every process; from here each process draws its own dropout: seed + process_index (checkpoints keep each one's)
    set_seed(args.seed, device_specific=True)
    # a copy of the prepared model's weights (identical on every process); it draws no random numbers
    ema = WeightEma(accelerator.unwrap_model(model), decay=args.ema_decay, warmup_steps=args.ema_warmup_steps) if (
        args.ema_decay) else None
    if report_to:
        accelerator.init_trackers("detr_custom", config={k: v for a in (model_args, data_args, args)
                                                         for k, v in asdict(a).items() if not isinstance(v, list)})
    return TrainingSetup(
        args=args, accelerator=accelerator, model=model, processor=processor, optimizer=optimizer,
        scheduler=scheduler, train_loader=train_loader, val_loader=val_loader, loader_generator=loader_generator,
        train_dataset=train_dataset, val_dataset=val_dataset, categories=categories, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, num_epochs=math.ceil(total_steps / steps_per_epoch), eval_every=eval_every,
        save_every=args.save_steps if args.save_steps > 0 else eval_every, checkpoint=checkpoint, started=started,
        budget=budget, ema=ema)
