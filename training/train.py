"""Fine-tune or train DETR with Accelerate, on COCO-format folders or Hub datasets.

    python -m training.train --config training/configs/demo.yaml [--key value ...]
    accelerate launch [--num_processes N] -m training.train --config ...      (also: detr-custom-train)

Arguments live in three dataclasses (arguments.py: ModelArguments, DataArguments, TrainArguments) parsed by
transformers' HfArgumentParser: a yaml/json file gives the values, the command line overrides them, `--help` lists
them all.
main() reads top to bottom like accelerate's examples: build, then the loop of train_step, evaluate_and_save and
save_checkpoint, then finish. Checkpoints (checkpoints.py) are written atomically and resume bit-identically.
"""
import itertools
import json
import logging
import math
import os
import platform
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
from modeling_detr_custom.fast_paths import cpu_bf16_support

from .arguments import DataArguments, ModelArguments, TrainArguments, parse_args
from .budget import TimeBudget
from .checkpoints import (RunState, check_output_dir, exits_130_on_interrupt, find_checkpoint, load_checkpoint,
                          record_evaluation, save_checkpoint, save_model)
from .data import Categories, DetrCollator, check_dataset, get_categories, load_coco, load_hub_detection
from .metrics import CocoEvaluator
from .transforms import Compose, RandomHorizontalFlip, RandomResize, make_detr_transforms

logger = get_logger("training.train")   # accelerate's: logs on the main process only (in_order / main_process_only)


def load_data(data_args: DataArguments, accelerator: Accelerator):
    if data_args.write_demo_data:
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
        elif data_args.train_annotation_file:
            train = load_coco(annotation_file=data_args.train_annotation_file, image_dir=data_args.train_image_dir)
            val = load_coco(annotation_file=data_args.val_annotation_file, image_dir=data_args.val_image_dir)
        elif data_args.data_dir:
            train, val = load_coco(data_args.data_dir, "train"), load_coco(data_args.data_dir, "val")
        else:
            raise ValueError("Give --data_dir (COCO layout), --train/val_annotation_file + image dirs, "
                             "or --dataset_name.")
    categories = get_categories(train)
    if data_args.max_train_samples:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples:
        val = val.select(range(min(data_args.max_eval_samples, len(val))))
    return train, val, categories


def build_model(model_args: ModelArguments, categories) -> DetrCustomForObjectDetection:
    labels = {"num_labels": len(categories.names), "id2label": categories.id2label, "label2id": categories.label2id}
    if model_args.model_name_or_path:
        model = DetrCustomForObjectDetection.from_pretrained(
            model_args.model_name_or_path, ignore_mismatched_sizes=True, **labels)
        logger.info("%s: class head sized for the dataset's %d classes (re-initialized if the checkpoint had "
                    "another count; the rest of the model is loaded)", model_args.model_name_or_path,
                    labels["num_labels"])
        return model
    config = DetrCustomConfig(
        backbone=model_args.backbone, use_pretrained_backbone=model_args.use_pretrained_backbone,
        freeze_batch_norm=model_args.freeze_batch_norm, freeze_backbone_stem=model_args.freeze_backbone_stem,
        dilation=model_args.dilation, d_model=model_args.d_model, encoder_layers=model_args.encoder_layers,
        decoder_layers=model_args.decoder_layers, encoder_attention_heads=model_args.num_heads,
        decoder_attention_heads=model_args.num_heads, encoder_ffn_dim=model_args.ffn_dim,
        decoder_ffn_dim=model_args.ffn_dim, num_queries=model_args.num_queries, dropout=model_args.dropout,
        attention_dropout=model_args.dropout, activation_dropout=model_args.dropout,
        position_embedding_type=model_args.position_embedding_type, auxiliary_loss=model_args.auxiliary_loss,
        eos_coefficient=model_args.eos_coefficient, **labels)
    return DetrCustomForObjectDetection(config)


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


def build_scheduler(optimizer, args: TrainArguments, *, steps_per_epoch: int, total_steps: Callable[[], int]):
    """LR factor of the optimizer step (the scheduler steps once per optimizer step, see make_accelerator).
    total_steps is read when needed: a time budget sizes it after the first (warm-up) steps."""
    if args.lr_scheduler_type == "cosine":
        def factor(step):   # matches transformers' get_cosine_schedule_with_warmup
            if step < args.warmup_steps:
                return float(step) / float(max(1, args.warmup_steps))
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
    report_to = resolve_report_to(args.report_to)
    accelerator = make_accelerator(args, log_with=report_to)
    set_seed(args.seed)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir)
    started = time.time()
    budget = TimeBudget(args.max_train_minutes) if args.max_train_minutes > 0 else None   # its clock starts now

    train_dataset, val_dataset, categories = load_data(data_args, accelerator)
    model = build_model(model_args, categories)
    with accelerator.main_process_first():
        check = {"num_queries": model.config.num_queries, "policy": data_args.check_policy,
                 "check_images": data_args.check_images}
        train_dataset, train_report = check_dataset(train_dataset, **check)
        val_dataset, val_report = check_dataset(val_dataset, **check)
    if accelerator.is_main_process:
        logger.info("train data check: %s\nval data check: %s", train_report, val_report)
    # images stay undecoded: the collate reads the stored pixels, on which COCO boxes are drawn
    train_dataset = train_dataset.cast_column("image", datasets.Image(decode=False))
    val_dataset = val_dataset.cast_column("image", datasets.Image(decode=False))
    processor = DetrCustomImageProcessor(size={"shortest_edge": data_args.eval_size,
                                               "longest_edge": data_args.max_size})
    train_loader, val_loader, loader_generator = build_loaders(
        train_dataset, val_dataset, processor=processor, categories=categories, data_args=data_args, args=args,
        rank=accelerator.process_index)

    optimizer = build_optimizer(model, args)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    eval_every = args.eval_steps if args.eval_steps > 0 else max(1, int(args.eval_every_epochs * steps_per_epoch))
    if budget is not None:
        budget.set_upper_bound(total_steps)
        if args.lr_scheduler_type == "cosine" and args.warmup_steps < budget.measure_steps:
            raise ValueError(f"max_train_minutes with the cosine schedule needs warmup_steps >= "
                             f"{budget.measure_steps}: the steps timed before sizing must not depend on the total.")
        accelerator.register_for_checkpointing(budget)   # a resumed run keeps the sized schedule
    scheduler = build_scheduler(optimizer, args, steps_per_epoch=steps_per_epoch,
                                total_steps=lambda: budget.total_steps if budget else total_steps)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)
    # the model's initialization and the shuffle (SeedableRandomSampler took the seed in prepare) are the same on
    # every process; from here each process draws its own dropout: seed + process_index (checkpoints keep each one's)
    set_seed(args.seed, device_specific=True)
    if report_to:
        accelerator.init_trackers("detr_custom", config={k: v for a in (model_args, data_args, args)
                                                         for k, v in asdict(a).items() if not isinstance(v, list)})
    return TrainingSetup(
        args=args, accelerator=accelerator, model=model, processor=processor, optimizer=optimizer,
        scheduler=scheduler, train_loader=train_loader, val_loader=val_loader, loader_generator=loader_generator,
        train_dataset=train_dataset, val_dataset=val_dataset, categories=categories, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, num_epochs=math.ceil(total_steps / steps_per_epoch), eval_every=eval_every,
        save_every=args.save_steps if args.save_steps > 0 else eval_every, checkpoint=checkpoint, started=started,
        budget=budget)


def epoch_batches(setup: TrainingSetup, epoch: int, *, steps_done: int):
    """The epoch's batches, less the first `steps_done` optimizer steps' worth (a run resumed mid-epoch). Seeds the
    shuffle, the augmentations and the workers from (seed, epoch) and the batch count, never from the global RNG."""
    skip = steps_done * setup.args.gradient_accumulation_steps
    setup.train_loader.set_epoch(epoch)
    setup.train_loader.collate_fn.set_epoch(epoch, batches_done=skip)
    # worker seeds (num_workers > 0): per process and epoch
    seed = np.random.SeedSequence([setup.args.seed, setup.accelerator.process_index, epoch]).generate_state(1)[0]
    setup.loader_generator.manual_seed(int(seed))
    return setup.accelerator.skip_first_batches(setup.train_loader, skip) if skip else setup.train_loader


LOGGED_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error", "class_error")


def train_step(setup: TrainingSetup, batch: dict, *, step: int, epoch: int, last_checkpoint: Path | None) -> dict:
    """Forward and backward on one batch; clip and step when the accumulated gradients sync. Returns the loss and
    its logged terms. A non-finite loss stops the run with the step and the batch's image ids."""
    accelerator, model = setup.accelerator, setup.model
    with accelerator.accumulate(model):
        try:
            outputs = model(**batch)   # batch: pixel_values, pixel_mask, labels
            if not torch.isfinite(outputs.loss):
                raise FloatingPointError(f"the loss is {outputs.loss.item()}.")
        except FloatingPointError as error:   # ours, or the loss's own check of the predictions
            image_ids = [int(label["image_id"]) for label in batch["labels"]]
            raise FloatingPointError(
                f"{error} Stopped at step {step} (epoch {epoch}), batch image ids {image_ids}. Last good "
                f"checkpoint: {last_checkpoint or 'none'}. Lower the learning rate, keep max_grad_norm > 0, or "
                "check these images' boxes.") from error
        accelerator.backward(outputs.loss)
        if accelerator.sync_gradients and setup.args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), setup.args.max_grad_norm)
        setup.optimizer.step()
        if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
            setup.scheduler.step()   # once per optimizer step, on any number of processes
        setup.optimizer.zero_grad()
    losses = {name: float(outputs.loss_dict[name].detach()) for name in LOGGED_TERMS}
    return {**losses, "loss": outputs.loss.item()}


def undecodable_batch(accelerator, batch: dict | None) -> bool:
    """True when no image of some process's batch could be decoded (its collator returned None and logged each file):
    every process then skips this batch together, so the processes' gradients and box counts stay in step."""
    if accelerator.num_processes == 1:
        return batch is None
    flag = torch.tensor([int(batch is None)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item())


def log_losses(setup: TrainingSetup, state: RunState, running: list[dict]) -> dict:
    """Appends to train_history each term's mean over the batches since the last log, then over processes: with the
    loss's global normalization, that is the loss of the global batch."""
    names = sorted(running[0])
    means = [sum(losses[n] for losses in running) / len(running) for n in names]
    local = torch.tensor(means, device=setup.accelerator.device)
    record = dict(zip(names, setup.accelerator.reduce(local, reduction="mean").tolist()))
    record.update(step=state.global_step, epoch=state.global_step / setup.steps_per_epoch,
                  lr=setup.scheduler.get_last_lr()[0], elapsed_s=round(time.time() - setup.started, 2))
    state.train_history.append(record)
    setup.accelerator.log({f"train/{k}": v for k, v in record.items()}, step=state.global_step)
    return record


@torch.no_grad()
def evaluate(setup: TrainingSetup) -> dict:
    """COCO box metrics on the validation set, on the main process ({} on the others)."""
    accelerator, model, processor = setup.accelerator, setup.model, setup.processor
    model.eval()
    predictions = []
    for batch in tqdm(setup.val_loader, desc="eval", disable=not accelerator.is_local_main_process, leave=False):
        if batch is None:   # no image of this batch could be decoded: the collator logged each file
            continue
        outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        target_sizes = torch.stack([label["orig_size"] for label in batch["labels"]])   # [batch, 2], (h, w)
        results = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=target_sizes)
        for label, result in zip(batch["labels"], results):
            detections = {name: value.cpu().tolist() for name, value in result.items()}
            predictions.append({"image_id": int(label["image_id"]), **detections})
    predictions = accelerator.gather_for_metrics(predictions, use_gather_object=True)
    model.train()
    if not accelerator.is_main_process:
        return {}
    categories = setup.categories
    evaluator = CocoEvaluator([{"id": i, "name": n} for i, n in zip(categories.ids, categories.names)],
                              categories.label_to_category_id)
    # an image the collator could not decode has no predictions: it leaves the ground truth too, and is named
    seen = {prediction["image_id"] for prediction in predictions}
    references = [{"image_id": row["image_id"], "objects": row["objects"]}
                  for row in setup.val_dataset.select_columns(["image_id", "objects"]) if row["image_id"] in seen]
    if len(references) < len(setup.val_dataset):
        logger.warning("evaluation: %d of %d validation images could not be decoded and are not evaluated (see the "
                       "collator's warnings for the files)", len(setup.val_dataset) - len(references),
                       len(setup.val_dataset))
    evaluator.add(predictions, references)
    return evaluator.compute()


def evaluate_and_save(setup: TrainingSetup, state: RunState, checkpoint: Path | None = None) -> None:
    """Evaluates, records the metrics, and saves best/ when this step has the best AP so far. `checkpoint`: the one
    saved at this step before evaluating; the evaluation is then written into its trainer_state.json."""
    accelerator = setup.accelerator
    try:
        # the val loader draws its workers' seed from the global RNG: forked, so that the training's random streams
        # are the same whether this step's checkpoint holds them before or after the evaluation
        with torch.random.fork_rng(devices=[]):
            metrics = evaluate(setup)
    except Exception as error:
        if checkpoint is None:
            raise
        raise RuntimeError(f"Evaluation at step {state.global_step} failed ({type(error).__name__}: {error}). The "
                           f"training state was saved before it in {checkpoint} (complete): fix the cause and "
                           f"resume with --resume_from_checkpoint {checkpoint}") from error
    if accelerator.is_main_process:
        state.eval_history.append({"step": state.global_step, "epoch": state.global_step / setup.steps_per_epoch,
                                   **metrics})
        accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=state.global_step)
        logger.info("step %d: AP %.4f AP50 %.4f", state.global_step, metrics["AP"], metrics["AP50"])
        if state.best_AP is None or metrics["AP"] > state.best_AP:
            state.best_AP, state.best_step = metrics["AP"], state.global_step
    state.best_step = broadcast_object_list([state.best_step])[0]   # the main process decided
    if state.best_step == state.global_step:
        save_model(accelerator, setup.model, setup.processor, Path(setup.args.output_dir) / "best")
    if checkpoint is not None:   # after best/: the checkpoint never names a best/ that was not written
        record_evaluation(accelerator, state, checkpoint)


def size_to_budget(setup: TrainingSetup, state: RunState) -> int:
    """After the budget's timed steps: times one evaluation (it draws no random numbers: training is unchanged),
    chooses total_steps on the main process and tells the others. Returns the new total."""
    budget, accelerator = setup.budget, setup.accelerator
    accelerator.wait_for_everyone()
    eval_started = budget.clock()
    evaluate(setup)
    eval_seconds = budget.clock() - eval_started
    error, total = None, None
    if accelerator.is_main_process:
        try:
            total = budget.size(global_step=state.global_step, eval_seconds=eval_seconds,
                                eval_every=setup.eval_every, min_steps=setup.args.warmup_steps)
        except ValueError as e:
            error = str(e)
    error, budget.seconds_per_step, budget.eval_seconds, total = broadcast_object_list(
        [error, budget.seconds_per_step, budget.eval_seconds, total])
    if error:
        raise ValueError(error)
    budget.total_steps = setup.total_steps = total
    logger.info("time budget: %.2f s/step and %.1f s per evaluation measured, %d steps fit in %g min (upper bound %d)",
                budget.seconds_per_step, budget.eval_seconds, total, budget.minutes, budget.upper_bound)
    return total


@exits_130_on_interrupt   # Ctrl-C: logs the command that resumes from the newest complete checkpoint
def main(argv=None):
    model_args, data_args, args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    setup = build(model_args, data_args, args)
    accelerator, model = setup.accelerator, setup.model
    state = RunState()
    if setup.checkpoint is not None:
        state = load_checkpoint(accelerator, setup.checkpoint, num_labels=len(setup.categories.names))
        if setup.budget is not None:   # the checkpoint's sizing, if it had one
            setup.total_steps = setup.budget.total_steps
    last_checkpoint = setup.checkpoint   # named when the loss diverges

    model.train()
    progress = tqdm(total=setup.total_steps, initial=state.global_step, desc="train",
                    disable=not accelerator.is_local_main_process)
    running = []   # the loss terms of each batch since the last log
    # epochs until total_steps: usually num_epochs, one more when undecodable batches were skipped
    done = False
    for epoch in itertools.count(state.epoch):
        steps_done = state.step_in_epoch if epoch == state.epoch else 0
        batches_trained = 0
        for batch in epoch_batches(setup, epoch, steps_done=steps_done):
            if undecodable_batch(accelerator, batch):
                continue
            batches_trained += 1
            running.append(train_step(setup, batch, step=state.global_step, epoch=epoch,
                                      last_checkpoint=last_checkpoint))
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            state.step_in_epoch += 1
            progress.update(1)
            if setup.budget is not None and setup.budget.step_done(state.global_step):
                progress.total = size_to_budget(setup, state)
            if state.global_step % args.logging_steps == 0:
                progress.set_postfix(loss=f"{log_losses(setup, state, running)['loss']:.3f}")
                running = []
            done = state.global_step >= setup.total_steps
            saving = state.global_step % setup.save_every == 0 or done
            if saving:   # before evaluating: a failing evaluation loses no training
                state.set_position(epoch, setup.steps_per_epoch)
                last_checkpoint = save_checkpoint(accelerator, state, output_dir=args.output_dir,
                                                  save_total_limit=args.save_total_limit)
            if state.global_step % setup.eval_every == 0 or done:
                evaluate_and_save(setup, state, checkpoint=last_checkpoint if saving else None)
            if done:
                break
        if batches_trained == 0 and steps_done == 0 and not done:
            raise ValueError(f"epoch {epoch} gave no batch to train on: no training image could be decoded (see the "
                             "warnings above for the files). Check the image folder, or run the dataset check with "
                             "--check_images decode.")
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if state.global_step >= setup.total_steps:
            break
    progress.close()

    save_model(accelerator, model, setup.processor, Path(args.output_dir) / "last")
    if accelerator.is_main_process:
        try:
            finish(setup, state, model_args=model_args, data_args=data_args)
        except Exception as error:   # the reports only: the model and the checkpoints are saved
            kept = [str(p) for p in (Path(args.output_dir) / "last", Path(args.output_dir) / "best", last_checkpoint)
                    if p is not None and p.exists()]
            raise RuntimeError(f"Training finished and was saved, but writing the reports (metrics.json, pictures, "
                               f"model cards) failed ({type(error).__name__}: {error}). Kept intact: "
                               f"{', '.join(kept)}.") from error
    accelerator.end_training()


def describe_run(setup: TrainingSetup, state: RunState, *, model_args: ModelArguments, data_args: DataArguments,
                 wall_time: float) -> dict:
    """metrics.json's "run": the recipe and the machine, as the model card reports them."""
    args, accelerator = setup.args, setup.accelerator
    return {
        "model_name_or_path": model_args.model_name_or_path,
        "dataset": data_args.dataset_name or data_args.data_dir or data_args.train_annotation_file,
        "dataset_id": data_args.dataset_name,
        "train_images": len(setup.train_dataset), "val_images": len(setup.val_dataset),
        "num_train_epochs": state.global_step / setup.steps_per_epoch, "max_steps": args.max_steps,
        "global_steps": state.global_step,
        "total_batch_size": args.per_device_train_batch_size * accelerator.num_processes
        * args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate, "backbone_learning_rate": args.backbone_learning_rate,
        "weight_decay": args.weight_decay, "lr_scheduler": args.lr_scheduler_type, "max_grad_norm": args.max_grad_norm,
        "mixed_precision": args.mixed_precision, "mixed_precision_used": accelerator.mixed_precision,
        "budget": setup.budget.describe() if setup.budget is not None else None,
        "augmentation": f"horizontal flip; multi-scale resize {min(data_args.train_scales)}-"
                        f"{max(data_args.train_scales)}" + (
                            f" or resize {data_args.crop_resize_scales} + random crop {data_args.crop_size} + resize "
                            "(the paper's random choice)" if data_args.random_crop else ""),
        "image_size": f"shortest edge {data_args.eval_size}, longest <= {data_args.max_size}",
        "hardware": f"{accelerator.num_processes} x {accelerator.device.type} ({platform.machine()}, "
                    f"{os.cpu_count()} CPU cores)",
        "num_processes": accelerator.num_processes, "wall_time_s": round(wall_time, 1), "seed": args.seed,
        "license": "apache-2.0",
    }


def finish(setup: TrainingSetup, state: RunState, *, model_args: ModelArguments, data_args: DataArguments) -> None:
    """On the main process, after last/ is saved: metrics.json, curves, predictions picture, model cards, push."""
    from hub_cards import push_output_dir, render_model_card

    from .plots import plot_curves, plot_predictions

    args, wall_time = setup.args, time.time() - setup.started
    output = Path(args.output_dir)
    best = next((r for r in state.eval_history if r["step"] == state.best_step), None)
    run = describe_run(setup, state, model_args=model_args, data_args=data_args, wall_time=wall_time)
    metrics = {"run": run, "train_history": state.train_history, "eval_history": state.eval_history, "best": best}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_curves(state.train_history, state.eval_history, output)
    best_dir = output / "best" if (output / "best").exists() else output / "last"
    plot_predictions(best_dir, setup.val_dataset, setup.categories, output / "predictions.png",
                     args.num_prediction_images)
    for folder in {best_dir, output / "last"}:
        for name in ("metrics.json", "loss_curve.png", "map_curve.png", "predictions.png"):
            if (output / name).exists():
                shutil.copy(output / name, folder / name)
    # each folder's card reports that folder's own evaluation (best: the best step, last: the final step)
    eval_steps = {output / "last": state.global_step, best_dir: state.best_step or state.global_step}
    for folder, step in eval_steps.items():
        render_model_card(folder, hub_model_id=args.hub_model_id, eval_step=step)
    if args.push_to_hub:
        push_output_dir(best_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
                        eval_step=eval_steps[best_dir])
    logger.info("done in %.0f s; best AP %s at step %s; folders: %s", wall_time, state.best_AP, state.best_step,
                best_dir)


if __name__ == "__main__":
    main()
