"""A run's folders on disk: checkpoint-N (accelerate's state + trainer_state.json), best/ and last/.

Every folder is written under a `.partial-` name and renamed when complete, so a run killed while saving never
leaves a folder that resume would trust. trainer_state.json holds `RunState`; its keys are the checkpoint format.
With --ema_decay, ema.safetensors holds the weights' average and its step count (training/ema.py).
Before the first step the output paths are checked (writable, folders where folders go); --overwrite_output_dir
removes only what a run writes (checkpoint folders are `checkpoint-<N>`, N digits: a user's `checkpoint-backup/` is
not one). A lock file in output_dir keeps a second run out of a folder that a running one writes. A Ctrl-C ends with
the command that resumes from the newest complete checkpoint.
"""
import atexit
import errno
import functools
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator, PartialState

from .ema import EMA_FILE

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")   # what a run writes and resume reads; other names are the user's
LOCK_FILE = ".detr-run.lock"   # in output_dir while a run writes there: who holds it (lock_output_dir)
STATE_FILE = "trainer_state.json"
# what accelerator.save_state writes for one model, optimizer and scheduler; resume needs each of them
STATE_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin")
# what a run writes in output_dir (finish: metrics.json and the pictures; TRACKER_PROJECT: tensorboard's logs, in
# accelerate's logging_dir = output_dir / the project name given to init_trackers); the rest is the user's
RUN_FOLDERS = ("best", "last")
RUN_FILES = ("metrics.json", "loss_curve.png", "map_curve.png", "predictions.png")
TRACKER_PROJECT = "detr_custom"


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
        path = checkpoint / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:   # truncated, or not ours
            raise ValueError(f"{path} is damaged ({error}): the checkpoint is incomplete. "
                             f"{_previous_hint(checkpoint)}") from error

    def save(self, checkpoint: Path) -> None:
        """Written to a temporary file and renamed: an interrupted write leaves the previous file whole."""
        path = checkpoint / STATE_FILE
        partial = path.with_name(f".partial-{path.name}")
        partial.write_text(json.dumps(asdict(self)))
        os.replace(partial, path)

    def set_position(self, epoch: int, steps_per_epoch: int) -> None:
        """Where a resumed run continues, (epoch, step_in_epoch): the next epoch once this one's steps are done."""
        self.epoch = epoch if self.step_in_epoch < steps_per_epoch else epoch + 1
        self.step_in_epoch = self.step_in_epoch % steps_per_epoch


def check_output_dir(output_dir: str, *, overwrite: bool, resuming: bool, logging_dir: str | None = None) -> None:
    """Before any training: every path the run writes can be written, and output_dir holds no run unless told to
    replace it (what a run writes is deleted now, the rest kept) or to continue it."""
    output = Path(output_dir)
    check_writable(output, "--output_dir")
    lock_output_dir(output)
    folders = [output / name for name in RUN_FOLDERS]
    if logging_dir is not None:   # accelerate's trackers write there: tensorboard in logging_dir/TRACKER_PROJECT
        check_writable(Path(logging_dir), "the logging dir (accelerate's project_dir)")
        folders.append(Path(logging_dir) / TRACKER_PROJECT)
    for path in folders:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file, but the run writes a folder there: move it or choose another "
                             "--output_dir.")
    for path in (output / name for name in RUN_FILES):
        if path.is_dir():
            raise ValueError(f"{path} is a folder, but the run writes a file there: move it or choose another "
                             "--output_dir.")
    holds_run = any((output / name).exists() for name in ("metrics.json", *RUN_FOLDERS)) or bool(
        _checkpoint_folders(output))
    if holds_run and not (overwrite or resuming):
        raise ValueError(f"output_dir {output} already holds a run: pass --overwrite_output_dir to replace it or "
                         "--resume_from_checkpoint latest to continue it.")
    if holds_run and overwrite and not resuming:
        remove_run(output, logging_dir=logging_dir)


def check_writable(folder: Path, what: str) -> None:
    """Creates the folder and writes a probe file in it, so that a bad path fails now, not at the first save."""
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{what} {folder}: {parent} is a file, not a folder. Choose a folder path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise ValueError(f"{what} {folder} is not writable ({error.strerror}): choose a folder you can write to, "
                         "or fix its permissions.") from error


def remove_run(output: Path, *, logging_dir: str | None = None) -> None:
    """--overwrite_output_dir: deletes what a run writes (checkpoints, partial saves, best/, last/, metrics, pictures,
    tensorboard logs) and keeps everything else in output_dir (notes, data)."""
    paths = [*_checkpoint_folders(output), *output.glob(".partial-*"),
             *(output / name for name in (*RUN_FOLDERS, *RUN_FILES))]
    if logging_dir is not None:
        paths.append(Path(logging_dir) / TRACKER_PROJECT)
    removed = []
    for path in sorted(p for p in set(paths) if p.exists()):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(str(path.relative_to(output)) if path.is_relative_to(output) else str(path))
    logger.warning("--overwrite_output_dir: removed the previous run's %s from %s (everything else kept)",
                   ", ".join(removed), output)


def _checkpoint_folders(output_dir) -> list[Path]:
    """output_dir's `checkpoint-<N>` folders (the run's), in no order; `checkpoint-backup` and the like are not."""
    return [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if CHECKPOINT_NAME.fullmatch(p.name)]


def _checkpoints(output_dir) -> list[Path]:
    """The checkpoints in output_dir, oldest first."""
    return sorted(_checkpoint_folders(output_dir), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


_held_locks: set[Path] = set()   # the lock files this process holds (released at the end of main, or at exit)


def _process_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (/proc/PID/stat field 22), or None where there is no /proc:
    with the PID, it tells the lock's process from a later one that got the same PID."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _lock_holder_running(holder: dict) -> bool:
    """Whether the process that wrote a lock is still running (another host's: assumed running, it can't be told)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("host") != socket.gethostname():
        return isinstance(pid, int)
    if pid == os.getpid():   # this process, but not a lock it holds: left by an earlier run in this process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: it exists
        pass
    start = _process_start(pid)
    return not (start and holder.get("process_start") and start != holder["process_start"])   # a reused PID


def _read_lock(path: Path) -> dict | None:
    """The lock's record; None when it is gone or unreadable twice (a holder killed while writing it)."""
    for attempt in range(2):
        try:
            holder = json.loads(path.read_text())
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            time.sleep(0.5)   # being written: read it again
    return {}


def lock_output_dir(output: Path) -> None:
    """Takes output_dir for this run: a second run there (the demo config overwrites, a resume deletes old
    checkpoints) would delete the first's checkpoints and mix the two runs' files. Refused with the holder's PID and
    start time while that process runs; a lock left by a process that is gone (killed) is taken over, logged."""
    path = output / LOCK_FILE
    if path in _held_locks:
        return
    record = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": sys.argv}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:   # released meanwhile
                continue
            if _lock_holder_running(holder):
                raise ValueError(
                    f"output_dir {output} is in use by another run: PID {holder.get('pid')} on "
                    f"{holder.get('host')}, started {holder.get('started')} ({' '.join(holder.get('command') or [])})"
                    ". Two runs in one folder delete each other's checkpoints: wait for it to end, stop it, or "
                    f"choose another --output_dir. (If that process is not a training run, delete {path}.)")
            logger.warning("%s: taking over a stale lock of PID %s (started %s), which is no longer running (killed?)",
                           output, holder.get("pid"), holder.get("started"))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        _held_locks.add(path)
        return
    raise ValueError(f"output_dir {output}: could not take {path} (other runs keep taking it): choose another "
                     "--output_dir.")


@atexit.register
def release_output_dir_locks() -> None:
    """Deletes the lock files this process holds (the end of main, or the interpreter's exit)."""
    for path in list(_held_locks):
        holder = _read_lock(path)
        if holder is not None and holder.get("pid") == os.getpid():
            path.unlink(missing_ok=True)
        _held_locks.discard(path)


def missing_files(checkpoint: Path) -> list[str]:
    """The files of a checkpoint that resume needs and that are not there (RNG states aside: see load_checkpoint)."""
    return [name for name in (*STATE_FILES, STATE_FILE) if not (checkpoint / name).is_file()]


def _previous_hint(checkpoint: Path) -> str:
    """Names the newest complete checkpoint before this one, for an error about a damaged one."""
    earlier = [c for c in _checkpoints(checkpoint.parent) if c.name != checkpoint.name and not missing_files(c)
               and int(c.name[len(CHECKPOINT_PREFIX):]) < _step(checkpoint)]
    if earlier:
        return f"Resume from the previous complete checkpoint: --resume_from_checkpoint {earlier[-1]}"
    return (f"There is no earlier complete checkpoint in {checkpoint.parent}: resume from another copy of the run, or "
            "start again with --overwrite_output_dir.")


def _step(checkpoint: Path) -> int:
    suffix = checkpoint.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if checkpoint.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else sys.maxsize


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


def check_checkpoint_complete(checkpoint: Path) -> None:
    """Every file resume needs is there: a damaged folder fails with its name and the checkpoint to use instead."""
    missing = missing_files(checkpoint)
    if missing:
        raise ValueError(f"{checkpoint} is incomplete: {', '.join(missing)} missing. {_previous_hint(checkpoint)}")


# config.json keys that are bookkeeping, not the model's shape or training
_CONFIG_BOOKKEEPING = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "auto_map",
                       "_commit_hash", "id2label", "label2id", "num_labels")


def _saved_shapes(checkpoint: Path) -> dict[str, tuple]:
    """The checkpoint's parameter names and shapes, from the safetensors header; a damaged file is named with the
    checkpoint to use instead."""
    from safetensors import SafetensorError, safe_open

    weights = checkpoint / "model.safetensors"
    try:
        with safe_open(weights, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights} is damaged ({error}): the checkpoint is incomplete (a full disk, an interrupted "
                         f"copy?). {_previous_hint(checkpoint)}") from error


def _config_differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(k for k in set(saved) | set(current) if k not in _CONFIG_BOOKKEEPING)
    return [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in keys
            if saved.get(k) != current.get(k)]


def check_checkpoint_model(checkpoint: Path, model, num_labels: int) -> None:
    """The checkpoint's weights must fit this run's model (built from the same flags and dataset): resuming with
    other classes or another architecture is a mistake, not a fine-tune. Compares every parameter's shape with the
    model's (whatever its heads are called: softmax or sigmoid, one head or one per decoder layer), and names the
    config fields that differ when the checkpoint has its config.json. Fields that differ without changing any shape
    (a loss weight, dropout) are resumed with this run's values, logged."""
    saved = _saved_shapes(checkpoint)
    current = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    config_file = checkpoint / "config.json"
    # through the config class: the file holds only the non-default values
    saved_config = type(model.config).from_json_file(str(config_file)) if config_file.is_file() else None
    differences = _config_differences(saved_config.to_dict(), model.config.to_dict()) if saved_config else []
    mismatched = [k for k in current if k in saved and saved[k] != current[k]]
    missing, unexpected = [k for k in current if k not in saved], [k for k in saved if k not in current]
    fix = ("resume with the run's own flags and dataset, or start a new run from it with --model_name_or_path "
           f"{checkpoint} (fine-tuning: the class head is refitted, the optimizer starts afresh).")
    if saved_config is not None and saved_config.num_labels != num_labels:
        raise ValueError(f"{checkpoint} was trained with {saved_config.num_labels} classes but the dataset has "
                         f"{num_labels}: {fix}")
    if not (mismatched or missing or unexpected):
        if differences:
            logger.warning("%s: resuming with values that differ from the checkpoint's (its weights fit): %s",
                           checkpoint, "; ".join(differences))
        return
    # no config.json (an older checkpoint): the class heads' first dimension tells the classes it was trained with
    heads = [k for k in mismatched if "class" in k and saved[k][1:] == current[k][1:]]
    if saved_config is None and heads and len(heads) == len(mismatched) and not (missing or unexpected):
        offset = current[heads[0]][0] - num_labels   # 1 with a softmax head ("no object"), 0 with a sigmoid one
        raise ValueError(f"{checkpoint} was trained with {saved[heads[0]][0] - offset} classes but the dataset has "
                         f"{num_labels}: {fix}")
    if differences:
        raise ValueError(f"{checkpoint} does not fit the model this run builds: {'; '.join(differences)} (config "
                         "fields; the flags of the same names, num_heads and ffn_dim for the attention heads and FFN "
                         f"widths). To continue the run, {fix}")
    parameters = [f"{k} {list(saved[k])} in the checkpoint, {list(current[k])} now" for k in mismatched]
    parameters += [f"{k} only now" for k in missing] + [f"{k} only in the checkpoint" for k in unexpected]
    raise ValueError(f"{checkpoint} does not fit the model this run builds ({len(parameters)} parameters differ, "
                     f"e.g. {'; '.join(parameters[:4])}): a flag differs from the run that wrote it (num_queries, "
                     f"the backbone, the layers, d_model, classification_loss?). To continue the run, {fix}")


def check_checkpoint_ema(checkpoint: Path, *, ema_on: bool) -> None:
    """EMA on needs the checkpoint's average: starting it afresh mid-run would silently change the run."""
    if ema_on and not (checkpoint / EMA_FILE).is_file():
        raise ValueError(f"{checkpoint} holds no average of the weights ({EMA_FILE}): it was saved with EMA off. "
                         "Resume with the run's own setting (--ema_decay 0), or start a new run with EMA from a saved "
                         "model (--model_name_or_path OUTPUT_DIR/last).")
    if not ema_on and (checkpoint / EMA_FILE).is_file():
        logger.warning("%s holds an average of the weights (%s) but --ema_decay is off: resuming without it "
                       "(evaluations and best/ and last/ use the trained weights from here on).", checkpoint, EMA_FILE)


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, *, num_labels: int, ema=None, model=None) -> RunState:
    """Model, optimizer, scheduler and RNG states back into the prepared objects (and the weights' average into
    `ema`, a training.ema.WeightEma, when EMA is on); the run state returned.

    Without its RNG state file a checkpoint still resumes (the weights, the optimizer and the position are exact, and
    refusing would leave no way to use them), with a WARNING: the run is no longer bit-identical to an uninterrupted
    one (dropout and augmentations draw other numbers)."""
    check_checkpoint_complete(checkpoint)
    state = RunState.load(checkpoint)   # before load_state: a damaged file fails before the model is touched
    if model is not None:
        check_checkpoint_model(checkpoint, accelerator.unwrap_model(model), num_labels)
    check_checkpoint_ema(checkpoint, ema_on=ema is not None)
    rng_file = checkpoint / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        logger.warning("%s is missing: resuming with fresh random states, so this run is NOT bit-identical to an "
                       "uninterrupted one (the model, optimizer and position are restored exactly).", rng_file)
    accelerator.load_state(str(checkpoint))
    if ema is not None:
        ema.load(checkpoint)
    logger.info("resumed from %s at step %d", checkpoint, state.global_step)
    return state


def save_checkpoint(accelerator: Accelerator, state: RunState, *, output_dir: str, save_total_limit: int,
                    ema=None, config=None) -> Path:
    """accelerator.save_state (and the weights' average, `ema`, when EMA is on; the model's `config` as config.json,
    which a resume compares with its own) into a temporary folder, renamed when complete. Keeps the newest
    save_total_limit. A full disk leaves the previous checkpoints as they were and says so."""
    output = Path(output_dir)
    final = output / f"{CHECKPOINT_PREFIX}{state.global_step}"
    partial = output / f".partial-{CHECKPOINT_PREFIX}{state.global_step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()   # every process has written its part (its RNG state) before the rename
        if accelerator.is_main_process:
            if ema is not None:   # the same average on every process: the main one writes it
                ema.save(partial)
            if config is not None:
                config.to_json_file(str(partial / "config.json"))
            state.save(partial)
    except (OSError, RuntimeError) as error:
        if not _disk_full(error, output):
            raise
        shutil.rmtree(partial, ignore_errors=True)   # frees what it took; resume never reads a .partial- anyway
        raise OSError(errno.ENOSPC, _disk_full_message(output, final, error)) from error
    if accelerator.is_main_process:
        _replace_folder(partial, final)
        for old in _checkpoints(output)[:-max(save_total_limit, 1)]:
            _remove_folder(old)
    accelerator.wait_for_everyone()
    return final


def _disk_full(error: BaseException, output: Path) -> bool:
    """Whether a failed write ran out of disk: ENOSPC in the chain, or torch's zip writer's words for it."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or any(
                words in str(error) for words in ("No space left", "unexpected pos", "file write failed")):
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full_message(output: Path, final: Path, error: BaseException) -> str:
    previous = [c for c in _checkpoints(output) if not missing_files(c)]
    free = shutil.disk_usage(output).free / 2**20
    size = sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file()) / 2**20 if previous else None
    kept = (f"The previous checkpoint {previous[-1]} is intact: free space (a checkpoint takes about {size:.0f} MiB) "
            f"and resume with --resume_from_checkpoint {previous[-1]}" if previous else
            "There is no earlier checkpoint: free space and start again")
    return (f"Saving {final.name} failed: the disk holding {output} is full ({free:.0f} MiB free; "
            f"{type(error).__name__}: {str(error).splitlines()[0][:200]}). {kept}, or choose an --output_dir on a "
            "disk with more room.")


def record_evaluation(accelerator: Accelerator, state: RunState, checkpoint: Path) -> None:
    """Writes the run state (with this step's evaluation and best) into a checkpoint saved before evaluating."""
    if accelerator.is_main_process:
        state.save(checkpoint)
    accelerator.wait_for_everyone()


def _replace_folder(partial: Path, final: Path) -> None:
    """Renames a complete folder into place; an older one is moved aside first (a folder can not be renamed onto a
    full one) and deleted after, so an interruption leaves the old folder or the new one, never a half of either."""
    old = final.with_name(f".partial-old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


def _remove_folder(folder: Path) -> None:
    """Renamed out of the names resume trusts before it is deleted: an interrupted deletion leaves a .partial-."""
    doomed = folder.with_name(f".partial-old-{folder.name}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def save_model(accelerator: Accelerator, model, processor, folder: Path) -> None:
    """save_pretrained of the unwrapped model and the processor: a folder that from_pretrained loads."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        partial = folder.with_name(f".partial-{folder.name}")
        shutil.rmtree(partial, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(partial)
        processor.save_pretrained(partial)
        _replace_folder(partial, folder)
    accelerator.wait_for_everyone()


def exits_130_on_interrupt(main):
    """Ctrl-C during `main(argv)`: logs the newest complete checkpoint and the command that resumes from it, then
    exits with code 130 (what shells report for Ctrl-C), with no traceback. What was saved stays as it was: a save in
    progress is only a .partial- folder, which resume ignores."""

    @functools.wraps(main)
    def wrapper(argv=None):
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            return main(argv)
        except KeyboardInterrupt as interrupt:
            if PartialState().is_main_process:
                logger.error("%s", interrupted_message(argv))
            raise TrainingInterrupted(130) from interrupt
        finally:   # the output_dir's lock, however main ended
            release_output_dir_locks()

    return wrapper


class TrainingInterrupted(SystemExit, KeyboardInterrupt):
    """A handled Ctrl-C: the process exits with its code (130) like any SystemExit, without a traceback, and a
    caller that catches KeyboardInterrupt (a notebook, a test) still catches it."""


def interrupted_message(argv: list[str]) -> str:
    """Where the newest complete checkpoint is, and the exact command (these arguments) that resumes from it."""
    from .arguments import parse_args

    output_dir = parse_args(argv)[2].output_dir
    complete = [c for c in _checkpoints(output_dir) if not missing_files(c)]
    if not complete:
        return (f"Interrupted before the first complete checkpoint in {output_dir}: nothing to resume. Run the same "
                "command again to start over.")
    kept = []   # the arguments less a previous --resume_from_checkpoint
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--resume_from_checkpoint":
            skip_value = True
        elif not arg.startswith("--resume_from_checkpoint="):
            kept.append(arg)
    # this interpreter (the virtual environment's), not whichever `python` the shell finds first
    launcher = f"{shlex.quote(sys.executable)} -m training.train" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else (
        f"accelerate launch --num_processes {os.environ['WORLD_SIZE']} -m training.train")
    command = f"{launcher} {shlex.join([*kept, '--resume_from_checkpoint', str(complete[-1])])}"
    return f"Interrupted. The last complete checkpoint is {complete[-1]}; resume with:\n    {command}"
