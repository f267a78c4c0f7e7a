"""The end of a run, on the main process: metrics.json (with the recipe and the machine), the curves and the
predictions picture, the model cards of best/ and last/, and the push to the Hub."""
import json
import os
import platform
import shutil
import time
from pathlib import Path

from accelerate.logging import get_logger

from .arguments import DataArguments, ModelArguments
from .build import TrainingSetup
from .checkpoints import RunState

logger = get_logger("training.train")


def describe_run(setup: TrainingSetup, state: RunState, *, model_args: ModelArguments, data_args: DataArguments,
                 wall_time: float) -> dict:
    """metrics.json's "run": the recipe and the machine, as the model card reports them."""
    args, accelerator = setup.args, setup.accelerator
    return {
        "model_name_or_path": model_args.model_name_or_path,
        "dataset": data_args.dataset_name or data_args.data_dir or data_args.train_annotation_file,
        # the Hub id the card links (a save_to_disk folder is not one)
        "dataset_id": None if data_args.dataset_name is None or Path(data_args.dataset_name).exists()
        else data_args.dataset_name,
        # a `datasets` dataset's splits (Hub or save_to_disk), as the card names what its figures were measured on
        "train_split": data_args.train_split if data_args.dataset_name else None,
        "val_split": data_args.val_split if data_args.dataset_name else None,
        "train_images": len(setup.train_dataset), "val_images": len(setup.val_dataset),
        "num_train_epochs": state.global_step / setup.steps_per_epoch, "max_steps": args.max_steps,
        "global_steps": state.global_step,
        "total_batch_size": args.per_device_train_batch_size * accelerator.num_processes
        * args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate, "backbone_learning_rate": args.backbone_learning_rate,
        "weight_decay": args.weight_decay, "lr_scheduler": args.lr_scheduler_type, "max_grad_norm": args.max_grad_norm,
        "mixed_precision": args.mixed_precision, "mixed_precision_used": accelerator.mixed_precision,
        "budget": setup.budget.describe() if setup.budget is not None else None,
        # the saved weights are this average of the trained ones (None: the trained weights themselves)
        "ema": setup.ema.describe() if setup.ema is not None else None,
        "augmentation": f"horizontal flip; multi-scale resize {min(data_args.train_scales)}-"
                        f"{max(data_args.train_scales)}" + (
                            f" or resize {data_args.crop_resize_scales} + random crop {data_args.crop_size} + resize "
                            "(the paper's random choice)" if data_args.random_crop else ""),
        "image_size": f"shortest edge {data_args.eval_size}, longest <= {data_args.max_size}",
        # the saved processor's duplicate removal (None: DETR's post-processing alone)
        "nms_iou_threshold": data_args.nms_iou_threshold,
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
