"""A run's folders on disk: checkpoint-N (accelerate's state + trainer_state.json), best/ and last/.

Every folder is written under a `.partial-` name and renamed when complete, so a run killed while saving never
leaves a folder that resume would trust. trainer_state.json holds `RunState`; its keys are the checkpoint format.
"""
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


@dataclass
class RunState:
    """Where the run is and what it has measured: the part of a checkpoint that accelerate's state does not hold."""

    global_step: int = 0                # optimizer steps done
    epoch: int = 0                      # the epoch a resumed run continues in
    step_in_epoch: int = 0              # optimizer steps already done in that epoch
    best_AP: float | None = None        # mixed case: the key in old trainer_state.json files
    best_step: int | None = None
    train_history: list[dict] = field(default_factory=list)   # one record per logging step
    eval_history: list[dict] = field(default_factory=list)    # one record per evaluation

    @classmethod
    def load(cls, checkpoint: Path) -> "RunState":
        return cls(**json.loads((checkpoint / STATE_FILE).read_text()))

    def save(self, checkpoint: Path) -> None:
        (checkpoint / STATE_FILE).write_text(json.dumps(asdict(self)))

    def set_position(self, epoch: int, steps_per_epoch: int) -> None:
        """Where a resumed run continues, (epoch, step_in_epoch): the next epoch once this one's steps are done."""
        self.epoch = epoch if self.step_in_epoch < steps_per_epoch else epoch + 1
        self.step_in_epoch = self.step_in_epoch % steps_per_epoch


def check_output_dir(output_dir: str, *, overwrite: bool, resuming: bool) -> None:
    """Refuses to train into a folder that holds a run unless told to replace it (deleted now) or to continue it."""
    output = Path(output_dir)
    holds_run = output.exists() and any((output / name).exists() for name in ("metrics.json", "last", "best")) or any(
        output.glob(f"{CHECKPOINT_PREFIX}*"))
    if holds_run and not (overwrite or resuming):
        raise ValueError(f"output_dir {output} already holds a run: pass --overwrite_output_dir to replace it or "
                         "--resume_from_checkpoint latest to continue it.")
    if holds_run and overwrite and not resuming:
        shutil.rmtree(output)


def _checkpoints(output_dir) -> list[Path]:
    """The complete checkpoints in output_dir, oldest first."""
    return sorted(Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> Path | None:
    """The folder to resume from: None, the given folder, or output_dir's newest checkpoint for 'latest'."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        if not (path / STATE_FILE).exists():
            raise ValueError(f"{path} is not a complete checkpoint (no {STATE_FILE}).")
        return path
    checkpoints = _checkpoints(output_dir)
    if not checkpoints:
        raise ValueError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}.")
    return checkpoints[-1]


def check_checkpoint_classes(checkpoint: Path, num_labels: int) -> None:
    """A checkpoint's class head must fit the dataset: resuming with other classes is a mistake, not a fine-tune."""
    from safetensors import safe_open

    weights = checkpoint / "model.safetensors"
    if not weights.exists():
        return
    with safe_open(weights, "pt") as f:
        key = next((k for k in f.keys() if k.endswith("class_embed.weight")), None)
        saved = f.get_slice(key).get_shape()[0] - 1 if key else num_labels   # the last class is "no object"
    if saved != num_labels:
        raise ValueError(f"{checkpoint} was trained with {saved} classes but the dataset has {num_labels}: resume "
                         "with the same dataset, or start a new run with --model_name_or_path to fine-tune.")


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, *, num_labels: int) -> RunState:
    """Model, optimizer, scheduler and RNG states back into the prepared objects; the run state returned."""
    check_checkpoint_classes(checkpoint, num_labels)
    accelerator.load_state(str(checkpoint))
    state = RunState.load(checkpoint)
    logger.info("resumed from %s at step %d", checkpoint, state.global_step)
    return state


def save_checkpoint(accelerator: Accelerator, state: RunState, *, output_dir: str, save_total_limit: int) -> Path:
    """accelerator.save_state into a temporary folder, renamed when complete. Keeps the newest save_total_limit."""
    output = Path(output_dir)
    final = output / f"{CHECKPOINT_PREFIX}{state.global_step}"
    partial = output / f".partial-{CHECKPOINT_PREFIX}{state.global_step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()   # every process has written its part (its RNG state) before the rename
    if accelerator.is_main_process:
        state.save(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in _checkpoints(output)[:-max(save_total_limit, 1)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_model(accelerator: Accelerator, model, processor, folder: Path) -> None:
    """save_pretrained of the unwrapped model and the processor: a folder that from_pretrained loads."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        partial = folder.with_name(f".partial-{folder.name}")
        shutil.rmtree(partial, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(partial)
        processor.save_pretrained(partial)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
