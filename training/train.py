"""Fine-tune or train DETR with Accelerate, on COCO-format folders or Hub datasets.

    python -m training.train --config training/configs/demo.yaml [--key value ...]
    accelerate launch [--num_processes N] -m training.train --config ...      (also: detr-custom-train)

Arguments live in three dataclasses (arguments.py: ModelArguments, DataArguments, TrainArguments) parsed by
transformers' HfArgumentParser: a yaml/json file gives the values, the command line overrides them, `--help` lists
them all.
main() reads top to bottom like accelerate's examples: build (build.py), then the loop of train_step,
save_checkpoint and evaluate_and_save, then finish (report.py). Checkpoints (checkpoints.py) are written atomically
and resume bit-identically. With --ema_decay, an average of the weights (ema.py) is updated after each optimizer
step, and it is what the evaluations measure and best/ and last/ hold.
"""
import contextlib
import itertools
import logging
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from .arguments import parse_args
from .build import TrainingSetup, build, build_model  # noqa: F401 (build_model: the script's public phases)
from .checkpoints import (RunState, exits_130_on_interrupt, load_checkpoint, record_evaluation,
                          release_output_dir_locks, save_checkpoint, save_model)
from .evaluation import plain_forward, predict_loader, score
from .report import finish

logger = get_logger("training.train")   # accelerate's: logs on the main process only (in_order / main_process_only)


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


# the class term under its own name (loss_ce, loss_focal or loss_vfl: the model's loss_detr_custom.CLASS_TERMS), the
# box terms and the errors; a record holds those the model computed
LOGGED_TERMS = ("loss_ce", "loss_focal", "loss_vfl", "loss_bbox", "loss_giou", "cardinality_error", "class_error")


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
            if setup.ema is not None:
                setup.ema.step(accelerator.unwrap_model(model), accelerator)
        setup.optimizer.zero_grad()
    losses = {name: float(outputs.loss_dict[name].detach()) for name in LOGGED_TERMS if name in outputs.loss_dict}
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


def evaluated_model(setup: TrainingSetup) -> torch.nn.Module:
    """What evaluations measure and best/ and last/ hold: the weights' average when EMA is on."""
    return setup.model if setup.ema is None else setup.ema.module


def gather_predictions(accelerator, predictions: list) -> list:
    """Every process's per-image predictions, on every process. Not `gather_for_metrics`: called after the
    validation loader has ended, it cuts the list by the remainder of whichever prepared loader is still active;
    an evaluation on the last batch of a training epoch then scored only some of the validation images (35 training
    images in batches of 8: 3 of 4). The copies a padded last batch adds are dropped by image_id when scoring."""
    return predictions if accelerator.num_processes == 1 else gather_object(predictions)


def evaluate(setup: TrainingSetup) -> dict:
    """COCO box metrics on the validation set, on the main process ({} on the others), of the model that is saved:
    the trained one, or its average with --ema_decay. Through evaluation.py, as detr-custom-eval: each image
    without its batch's padding and in the saved model's precision, so the number is what the saved folder gives."""
    accelerator, model = setup.accelerator, evaluated_model(setup)
    model.eval()
    predictions, _ = predict_loader(plain_forward(accelerator.unwrap_model(model)), setup.processor,
                                    setup.val_loader, progress=accelerator.is_local_main_process)
    predictions = gather_predictions(accelerator, predictions)
    if setup.ema is None:   # the average stays in eval mode
        model.train()
    if not accelerator.is_main_process:
        return {}
    return score(predictions, setup.val_dataset, setup.categories)


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
        save_model(accelerator, evaluated_model(setup), setup.processor, Path(setup.args.output_dir) / "best")
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
        if budget.short_of_budget:
            logger.warning("time budget: %s", budget.short_of_budget)
    error, budget.seconds_per_step, budget.eval_seconds, total = broadcast_object_list(
        [error, budget.seconds_per_step, budget.eval_seconds, total])
    if error:
        raise ValueError(error)
    budget.total_steps = budget.sized_total_steps = setup.total_steps = total
    budget.sized_at = budget.planned_at = state.global_step   # on every process: they re-plan at the same steps
    logger.info("time budget: %.2f s/step and %.1f s per evaluation measured, %d steps fit in %g min (upper bound %d)",
                budget.seconds_per_step, budget.eval_seconds, total, budget.minutes, budget.upper_bound)
    return total


def replan_budget(setup: TrainingSetup, state: RunState) -> int:
    """At a logging step after sizing: plans the rest of the run again from the recent steps' speed and the time
    left, on the main process, and tells the others (the plan includes the LR schedule's anchor). Returns the new
    total: the current step when nothing more fits."""
    budget, accelerator = setup.budget, setup.accelerator
    previous = budget.total_steps
    plan = None
    if accelerator.is_main_process:
        budget.replan(global_step=state.global_step, eval_every=setup.eval_every,
                      warmup_steps=setup.args.warmup_steps)
        plan = (budget.total_steps, budget.anchor_step, budget.anchor_progress, budget.seconds_per_step,
                budget.replans)
    if accelerator.num_processes > 1:
        plan = broadcast_object_list([plan])[0]
        (budget.total_steps, budget.anchor_step, budget.anchor_progress, budget.seconds_per_step,
         budget.replans) = plan
    budget.planned_at = state.global_step
    setup.total_steps = budget.total_steps
    if abs(setup.total_steps - previous) >= max(1, 0.05 * previous):   # the small moves of every plan stay quiet
        logger.info("time budget: %.2f s/step now, %.0f s left: %d steps planned (was %d)", budget.seconds_per_step,
                    budget.seconds_left, setup.total_steps, previous)
    return setup.total_steps


def budget_deadline(setup: TrainingSetup, state: RunState) -> bool:
    """The budget's deadline: the main process's clock decides for every process."""
    budget = setup.budget
    stop = [budget.out_of_time(state.global_step) if setup.accelerator.is_main_process else None]
    if setup.accelerator.num_processes > 1:
        stop = broadcast_object_list(stop)
    if stop[0] and budget.stopped_early_at is None:   # the other processes record the main one's decision
        budget.stopped_early_at = state.global_step
    if stop[0]:
        logger.warning("time budget: stopping at step %d of %d: one more step and the final evaluation and save would "
                       "not fit in %g min (the steps ran slower than the %.2f s/step measured)", state.global_step,
                       setup.total_steps, budget.minutes, budget.seconds_per_step)
    return bool(stop[0])


@contextlib.contextmanager
def no_empty_folders_on_failure(output_dir: Path):
    """A run that fails before training (bad data, a missing split) leaves no trace: the output folder (and its
    parents) that it created are removed again, once its lock is released, if they are still empty."""
    created = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]   # deepest first
    try:
        yield
    except BaseException:
        release_output_dir_locks()
        for folder in created:
            try:
                folder.rmdir()   # only an empty folder: what the user or another process put there stays
            except OSError:
                break
        raise


@exits_130_on_interrupt   # Ctrl-C: logs the command that resumes from the newest complete checkpoint
def main(argv=None):
    model_args, data_args, args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with no_empty_folders_on_failure(Path(args.output_dir)):
        setup = build(model_args, data_args, args)
    accelerator, model = setup.accelerator, setup.model
    state = RunState()
    if setup.checkpoint is not None:
        state = load_checkpoint(accelerator, setup.checkpoint, num_labels=len(setup.categories.names), ema=setup.ema,
                                model=model)
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
                if setup.budget is not None and setup.budget.planned_at is not None and (
                        setup.budget.planned_at < state.global_step < setup.total_steps):
                    progress.total = replan_budget(setup, state)
            done = state.global_step >= setup.total_steps
            # the deadline: every step on one process, every logging_steps on several (it costs a broadcast there)
            if not done and setup.budget is not None and (
                    accelerator.num_processes == 1 or state.global_step % args.logging_steps == 0):
                done = budget_deadline(setup, state)
            saving = state.global_step % setup.save_every == 0 or done
            evaluating = state.global_step % setup.eval_every == 0 or done
            paused_from = setup.budget.clock() if setup.budget is not None and evaluating else None
            if saving:   # before evaluating: a failing evaluation loses no training
                state.set_position(epoch, setup.steps_per_epoch)
                last_checkpoint = save_checkpoint(accelerator, state, output_dir=args.output_dir,
                                                  save_total_limit=args.save_total_limit, ema=setup.ema,
                                                  config=accelerator.unwrap_model(model).config)
            if evaluating:
                evaluate_and_save(setup, state, checkpoint=last_checkpoint if saving else None)
            if paused_from is not None:   # what the next plans count per evaluation (with its checkpoint)
                setup.budget.evaluated(setup.budget.clock() - paused_from)
            if done:
                break
        if batches_trained == 0 and steps_done == 0 and not done:
            raise ValueError(f"epoch {epoch} gave no batch to train on: no training image could be decoded (see the "
                             "warnings above for the files). Check the image folder, or run the dataset check with "
                             "--check_images decode.")
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if done or state.global_step >= setup.total_steps:
            break
    progress.close()

    save_model(accelerator, evaluated_model(setup), setup.processor, Path(args.output_dir) / "last")
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


if __name__ == "__main__":
    main()
