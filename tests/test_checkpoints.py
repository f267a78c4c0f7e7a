"""What a run keeps when something goes wrong: a failing evaluation or report, a bad output_dir, a Ctrl-C, a damaged
checkpoint, an interrupted save. Tiny runs on the embedded dataset, as in test_train.py."""
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_run import run as _run
from tiny_run import write_config as _config

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomImageProcessor
from training import build, checkpoints
from training.checkpoints import check_output_dir, missing_files, save_model
from training.metrics import CocoEvaluator

REPO = Path(__file__).parents[1]


def _state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


# 1. a failure in evaluation or in the reports loses no training

def test_failing_evaluation_keeps_the_checkpoint_of_its_step(tmp_path, data_dir, monkeypatch):
    def broken_compute(self):
        raise RuntimeError("pycocotools broke")

    monkeypatch.setattr(CocoEvaluator, "compute", broken_compute)
    with pytest.raises(RuntimeError, match=r"Evaluation at step 2 failed \(RuntimeError: pycocotools broke\)\. The "
                                           r"training state was saved before it in .*checkpoint-2 \(complete\)"):
        _run(_config(tmp_path, data_dir, max_steps=4, eval_steps=2))
    run = tmp_path / "run"
    assert [p.name for p in run.iterdir() if p.name.startswith(("checkpoint-", ".partial"))] == ["checkpoint-2"]
    assert missing_files(run / "checkpoint-2") == []
    state = _state(run / "checkpoint-2")
    assert (state["global_step"], state["eval_history"], state["best_step"]) == (2, [], None)
    monkeypatch.undo()
    _run(_config(tmp_path, data_dir, max_steps=4, eval_steps=2, resume_from_checkpoint="latest"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["step"] for r in metrics["train_history"]] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics["eval_history"]] == [4]
    # the checkpoint saved before its evaluation records that evaluation afterwards: what a resume reads
    assert _state(run / "checkpoint-4")["eval_history"] == metrics["eval_history"]
    assert _state(run / "checkpoint-4")["best_step"] == 4 and (run / "best" / "model.safetensors").exists()


def test_failing_reports_keep_the_model_and_checkpoints(tmp_path, data_dir, monkeypatch):
    def broken_plot(*args, **kwargs):
        raise OSError("no space left for pictures")

    monkeypatch.setattr("training.plots.plot_curves", broken_plot)
    run = tmp_path / "run"
    kept = ", ".join(re.escape(str(run / name)) for name in ("last", "best", "checkpoint-2"))
    with pytest.raises(RuntimeError, match=r"Training finished and was saved, but writing the reports \(metrics.json, "
                                           r"pictures, model cards\) failed \(OSError: no space left for pictures\)\. "
                                           rf"Kept intact: {kept}\.$"):
        _run(_config(tmp_path, data_dir, max_steps=2, eval_steps=2))
    assert DetrCustomForObjectDetection.from_pretrained(run / "last").config.num_labels == 5
    assert DetrCustomImageProcessor.from_pretrained(run / "best").size["shortest_edge"] == 64
    assert missing_files(run / "checkpoint-2") == [] and _state(run / "checkpoint-2")["eval_history"][0]["step"] == 2
    assert not list(run.glob(".partial-*"))


# 2. output paths are checked before the first step

@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if the run gets as far as loading data."""
    def load_data(*args, **kwargs):
        raise AssertionError("the run got past its output checks")

    monkeypatch.setattr(build, "load_data", load_data)


def test_output_dir_that_is_a_file_fails_before_training(tmp_path, data_dir, no_training):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(ValueError, match=rf"--output_dir {re.escape(str(tmp_path / 'run'))}: "
                                         rf"{re.escape(str(tmp_path / 'run'))} is a file, not a folder"):
        _run(_config(tmp_path, data_dir, max_steps=1))


def test_output_dir_under_a_file_fails_before_training(tmp_path, data_dir, no_training):
    (tmp_path / "file").write_text("a file")
    output = tmp_path / "file" / "sub" / "run"
    with pytest.raises(ValueError, match=rf"--output_dir {re.escape(str(output))}: "
                                         rf"{re.escape(str(tmp_path / 'file'))} is a file, not a folder"):
        _run(_config(tmp_path, data_dir, max_steps=1, output_dir=str(output)))


def test_unwritable_output_dir_fails_before_training(tmp_path, data_dir, no_training, monkeypatch):
    def refused(*args, **kwargs):   # what a folder without write permission answers (tests run as root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoints.tempfile, "TemporaryFile", refused)
    with pytest.raises(ValueError, match=rf"--output_dir {re.escape(str(tmp_path / 'run'))} is not writable "
                                         r"\(Permission denied\): choose a folder you can write to"):
        _run(_config(tmp_path, data_dir, max_steps=1))


def test_run_paths_of_the_wrong_kind_are_refused(tmp_path):
    (tmp_path / "detr_custom").write_text("not the tensorboard folder")
    with pytest.raises(ValueError, match=r"detr_custom is a file, but the run writes a folder there"):
        check_output_dir(str(tmp_path), overwrite=True, resuming=False, logging_dir=str(tmp_path))
    (tmp_path / "detr_custom").unlink()
    (tmp_path / "metrics.json").mkdir()
    with pytest.raises(ValueError, match=r"metrics.json is a folder, but the run writes a file there"):
        check_output_dir(str(tmp_path), overwrite=True, resuming=False)
    assert not list(tmp_path.glob(".write-probe-*"))   # the probe cleans up after itself


# 3. --overwrite_output_dir removes what a run wrote, nothing else

def test_overwrite_removes_only_what_a_run_wrote(tmp_path, data_dir, caplog):
    _run(_config(tmp_path, data_dir, max_steps=1, eval_steps=1))
    run = tmp_path / "run"
    (run / "notes.txt").write_text("my notes")
    (run / "data").mkdir()
    (run / "data" / "images.txt").write_text("my data")
    (run / "detr_custom").mkdir()   # tensorboard's logs from an earlier run (this one has report_to none)
    (run / ".partial-checkpoint-9").mkdir()
    written = {"checkpoint-1", "best", "last", "metrics.json", "loss_curve.png", "map_curve.png", "predictions.png"}
    assert written <= {p.name for p in run.iterdir()}
    with caplog.at_level(logging.WARNING, logger="training.checkpoints"):
        _run(_config(tmp_path, data_dir, max_steps=2, eval_steps=2, overwrite_output_dir=True))
    assert (run / "notes.txt").read_text() == "my notes" and (run / "data" / "images.txt").read_text() == "my data"
    kept = {p.name for p in run.iterdir()}
    assert kept == written - {"checkpoint-1"} | {"checkpoint-2", "notes.txt", "data"}
    assert json.loads((run / "metrics.json").read_text())["run"]["global_steps"] == 2
    removed = [r.getMessage() for r in caplog.records if "--overwrite_output_dir" in r.getMessage()]
    assert removed == [f"--overwrite_output_dir: removed the previous run's .partial-checkpoint-9, best, "
                       "checkpoint-1, detr_custom, last, loss_curve.png, map_curve.png, metrics.json, predictions.png "
                       f"from {run} (everything else kept)"]


def test_user_folders_named_checkpoint_something_are_kept_and_ignored_by_resume(tmp_path, data_dir):
    _run(_config(tmp_path, data_dir, max_steps=1, eval_steps=1))
    run = tmp_path / "run"
    for name in ("checkpoint-backup", "checkpoint-best-model"):
        (run / name).mkdir()
        (run / name / "mine.txt").write_text("keep me")
    _run(_config(tmp_path, data_dir, max_steps=2, eval_steps=2, resume_from_checkpoint="latest"))   # checkpoint-1
    assert json.loads((run / "metrics.json").read_text())["run"]["global_steps"] == 2
    _run(_config(tmp_path, data_dir, max_steps=1, eval_steps=1, overwrite_output_dir=True))
    assert (run / "checkpoint-backup" / "mine.txt").read_text() == "keep me"
    assert (run / "checkpoint-best-model" / "mine.txt").read_text() == "keep me"
    assert not (run / "checkpoint-2").exists() and (run / "checkpoint-1").exists()


def _start_run(config, *extra) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "training.train", "--config", str(config), *extra], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_run_in_a_busy_output_dir_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, data_dir, caplog):
    """Two real processes on one output_dir: the second (overwriting, as the demo config does) is refused with the
    first's PID while it runs, and deletes nothing; once the first is killed (its lock left behind), a run starts."""
    config = _config(tmp_path, data_dir, max_steps=500, save_steps=1, eval_steps=1000)
    first = _start_run(config)
    run = tmp_path / "run"
    deadline = time.time() + 300
    while not (run / "checkpoint-1").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()[1][-3000:]
    second = _start_run(config, "--overwrite_output_dir", "true", "--max_steps", "1")
    _, stderr = second.communicate(timeout=300)
    assert second.returncode != 0
    assert f"is in use by another run: PID {first.pid} on " in stderr and "choose another --output_dir" in stderr
    assert first.poll() is None and list(run.glob("checkpoint-*"))   # the first run goes on, its checkpoints kept
    holder = json.loads((run / checkpoints.LOCK_FILE).read_text())
    assert holder["pid"] == first.pid
    first.kill()   # SIGKILL: no cleanup, the lock stays
    first.communicate(timeout=60)
    assert (run / checkpoints.LOCK_FILE).exists()
    with caplog.at_level(logging.WARNING, logger="training.checkpoints"):
        _run(_config(tmp_path, data_dir, max_steps=1, eval_steps=1, overwrite_output_dir=True))
    assert any(f"stale lock of PID {first.pid}" in r.getMessage() for r in caplog.records)
    assert json.loads((run / "metrics.json").read_text())["run"]["global_steps"] == 1
    assert not (run / checkpoints.LOCK_FILE).exists()   # released at the end of the run


# 4. Ctrl-C ends with the command that resumes

def _as_from_a_shell():
    """The child's Ctrl-C as a shell starts it: SIGINT at its default disposition and no signal blocked, whatever
    the test process inherited or a library set in it (an ignored or blocked SIGINT is inherited across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tmp_path, data_dir):
    config = _config(tmp_path, data_dir, max_steps=500, save_steps=1, eval_steps=1000)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "training.train", "--config", str(config)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_from_a_shell)
    run = tmp_path / "run"
    deadline = time.time() + 300
    while not (run / "checkpoint-1").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    complete = [c for c in sorted(run.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))]
    assert complete and all(missing_files(c) == [] for c in complete)   # a save cut short is only a .partial-
    command = f"{sys.executable} -m training.train --config {config} --resume_from_checkpoint {complete[-1]}"
    assert f"Interrupted. The last complete checkpoint is {complete[-1]}; resume with:\n    {command}" in stderr
    step = _state(complete[-1])["global_step"]
    _run(*shlex.split(command)[4:], "--max_steps", str(step + 1))   # the command's arguments, one step further
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["step"] for r in metrics["train_history"]] == list(range(1, step + 2))


def test_interrupted_message_without_checkpoint_and_with_an_earlier_resume(tmp_path, data_dir):
    config = _config(tmp_path, data_dir)
    assert checkpoints.interrupted_message(["--config", str(config)]) == (
        f"Interrupted before the first complete checkpoint in {tmp_path / 'run'}: nothing to resume. Run the same "
        "command again to start over.")
    (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "trainer_state.json"):
        (tmp_path / "run" / "checkpoint-3" / name).write_text("")
    (tmp_path / "run" / "checkpoint-5").mkdir()   # incomplete: not named
    message = checkpoints.interrupted_message(["--config", str(config), "--resume_from_checkpoint", "latest",
                                               "--seed", "3"])
    assert message.endswith(f"python -m training.train --config {config} --seed 3 --resume_from_checkpoint "
                            f"{tmp_path / 'run' / 'checkpoint-3'}")


# 5. a damaged checkpoint is named, with the one to use instead

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("two")
    _run(_config(root, data_dir, max_steps=2, save_steps=1, eval_steps=100))
    assert sorted(p.name for p in (root / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    return root / "run"


def _damaged_copy(two_checkpoints, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    return run


@pytest.mark.parametrize("name", ["optimizer.bin", "model.safetensors", "scheduler.bin"])
def test_missing_state_file_is_named_with_the_previous_checkpoint(tmp_path, data_dir, two_checkpoints, name):
    run = _damaged_copy(two_checkpoints, tmp_path)
    (run / "checkpoint-2" / name).unlink()
    with pytest.raises(ValueError, match=rf"{re.escape(str(run / 'checkpoint-2'))} is incomplete: {name} missing\. "
                                         rf"Resume from the previous complete checkpoint: --resume_from_checkpoint "
                                         rf"{re.escape(str(run / 'checkpoint-1'))}$"):
        _run(_config(tmp_path, data_dir, max_steps=3, save_steps=1, resume_from_checkpoint="latest"))


def test_truncated_trainer_state_is_named(tmp_path, data_dir, two_checkpoints):
    run = _damaged_copy(two_checkpoints, tmp_path)
    state_file = run / "checkpoint-2" / "trainer_state.json"
    state_file.write_text(state_file.read_text()[:40])
    (run / "checkpoint-1" / "optimizer.bin").unlink()   # no complete one before it either
    with pytest.raises(ValueError, match=rf"{re.escape(str(state_file))} is damaged \(.*\): the checkpoint is "
                                         rf"incomplete\. There is no earlier complete checkpoint in "
                                         rf"{re.escape(str(run))}: .*--overwrite_output_dir"):
        _run(_config(tmp_path, data_dir, max_steps=3, save_steps=1, resume_from_checkpoint=str(run / "checkpoint-2")))


def test_truncated_weights_are_named_with_the_previous_checkpoint(tmp_path, data_dir, two_checkpoints):
    run = _damaged_copy(two_checkpoints, tmp_path)
    weights = run / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))} is damaged \(.*\): the checkpoint is "
                                         r"incomplete .*Resume from the previous complete checkpoint: "
                                         rf"--resume_from_checkpoint {re.escape(str(run / 'checkpoint-1'))}"):
        _run(_config(tmp_path, data_dir, max_steps=3, save_steps=1, resume_from_checkpoint="latest"))


def test_resume_with_changed_model_flags_names_them(tmp_path, data_dir, two_checkpoints):
    run = _damaged_copy(two_checkpoints, tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint-2 does not fit the model this run builds: decoder_layers: 2 in "
                                         r"the checkpoint, 3 now; num_queries: 10 in the checkpoint, 12 now \(config "
                                         r"fields.*--model_name_or_path"):
        _run(_config(tmp_path, data_dir, max_steps=3, num_queries=12, decoder_layers=3,
                     resume_from_checkpoint="latest"))
    (run / "checkpoint-2" / "config.json").unlink()   # a checkpoint written before checkpoints held their config
    with pytest.raises(ValueError, match=r"checkpoint-2 does not fit the model this run builds \(\d+ parameters "
                                         r"differ, e\.g\. .*a flag differs from the run that wrote it \(num_queries"):
        _run(_config(tmp_path, data_dir, max_steps=3, num_queries=12, resume_from_checkpoint="latest"))


@pytest.mark.parametrize("variant", [{}, {"decoder_type": "deformable", "num_feature_levels": 2}],
                         ids=["detr", "deformable"])
def test_sigmoid_head_runs_resume_and_other_classes_are_refused(tmp_path, data_dir, variant):
    """A focal-loss run (sigmoid head: one logit per class, no "no object"), DETR's decoder or the deformable one
    (a class head per decoder layer), resumes; on a dataset with another class count it is refused by name."""
    from training.sample_data import write_sample_dataset

    flags = {"classification_loss": "focal", "eval_steps": 100, "save_steps": 1, **variant}
    _run(_config(tmp_path, data_dir, max_steps=1, **flags))
    _run(_config(tmp_path, data_dir, max_steps=2, resume_from_checkpoint="latest", **flags))
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text())["run"]["global_steps"] == 2
    other = tmp_path / "other"
    write_sample_dataset(other, num_train=4, num_val=2, seed=0)
    for split in ("train", "val"):
        path = other / "annotations" / f"instances_{split}2017.json"
        coco = json.loads(path.read_text())
        coco["categories"].append({"id": 99, "name": "extra"})
        path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="checkpoint-2 was trained with 5 classes but the dataset has 6"):
        _run(_config(tmp_path, other, max_steps=3, resume_from_checkpoint="latest", **flags))
    (run / "checkpoint-2" / "config.json").unlink()   # the parameters' shapes tell it too
    with pytest.raises(ValueError, match="checkpoint-2 was trained with 5 classes but the dataset has 6"):
        _run(_config(tmp_path, other, max_steps=3, resume_from_checkpoint="latest", **flags))


# 6. a full disk while saving keeps the previous checkpoint

def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, data_dir, monkeypatch):
    """On a real full disk (a small tmpfs, where the test may mount one), else with torch's zip writer failing as it
    does on a full disk: the run says the disk is full, checkpoint-1 stays complete and a resume from it finishes."""
    disk = tmp_path / "disk"
    mounted = os.geteuid() == 0 and _mount_tmpfs(disk, "1g")
    try:
        flags = {"output_dir": str(disk / "run"), "save_steps": 1, "eval_steps": 100, "save_total_limit": 1}
        _run(_config(tmp_path, data_dir, max_steps=1, **flags))
        run = disk / "run"
        if mounted:   # shrink the disk to what is used now plus half a checkpoint: the next one cannot fit
            used = shutil.disk_usage(disk).used
            checkpoint_size = sum(f.stat().st_size for f in (run / "checkpoint-1").rglob("*"))
            subprocess.run(["mount", "-o", f"remount,size={used + checkpoint_size // 2}", str(disk)], check=True)
        else:
            real_save = torch.save

            def full_disk_save(obj, f, *args, **kwargs):   # what torch says when the disk fills mid-write
                if "checkpoint-2" in str(f):
                    raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4416 vs 4310")
                return real_save(obj, f, *args, **kwargs)

            monkeypatch.setattr(torch, "save", full_disk_save)
        with pytest.raises(OSError, match=r"Saving checkpoint-2 failed: the disk holding .* is full .* The previous "
                                          rf"checkpoint {re.escape(str(run / 'checkpoint-1'))} is intact: free space "
                                          r".*--resume_from_checkpoint .*checkpoint-1"):
            _run(_config(tmp_path, data_dir, max_steps=3, resume_from_checkpoint="latest", **flags))
        assert missing_files(run / "checkpoint-1") == [] and not list(run.glob(".partial-checkpoint-*"))
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=1g", str(disk)], check=True)
        monkeypatch.undo()
        _run(_config(tmp_path, data_dir, max_steps=3, resume_from_checkpoint=str(run / "checkpoint-1"), **flags))
        assert json.loads((run / "metrics.json").read_text())["run"]["global_steps"] == 3
    finally:
        # a file the run left open keeps the disk busy: then detach it lazily, never leave it mounted
        if mounted and subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def test_missing_random_states_resume_with_a_warning(tmp_path, data_dir, two_checkpoints, caplog):
    """Chosen: resume (the weights, optimizer and position are exact; refusing would strand them) and say loudly
    that the run is no longer bit-identical."""
    run = _damaged_copy(two_checkpoints, tmp_path)
    (run / "checkpoint-2" / "random_states_0.pkl").unlink()
    with caplog.at_level(logging.WARNING, logger="training.checkpoints"):
        _run(_config(tmp_path, data_dir, max_steps=3, save_steps=1, eval_steps=100, resume_from_checkpoint="latest"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "random_states_0.pkl" in r.getMessage()]
    assert len(warnings) == 1 and "NOT bit-identical" in warnings[0].getMessage()
    assert [r["step"] for r in json.loads((run / "metrics.json").read_text())["train_history"]] == [1, 2, 3]


# 6. best/ and last/ are whole or absent

def _one_process_tiny_model():
    """What save_model needs from a 1-process run: a stand-in accelerator, a tiny model and a processor."""
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, unwrap_model=lambda m: m)
    config = DetrCustomConfig(backbone="resnet18", use_pretrained_backbone=False, d_model=32, encoder_layers=1,
                              decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5, num_labels=2)
    return accelerator, DetrCustomForObjectDetection(config), DetrCustomImageProcessor()


def test_interrupted_save_model_leaves_the_previous_folder_whole(tmp_path, monkeypatch):
    accelerator, model, processor = _one_process_tiny_model()
    best = tmp_path / "best"
    save_model(accelerator, model, processor, best)
    saved = {p.name: p.read_bytes() for p in best.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(saved)

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(DetrCustomImageProcessor, "save_pretrained", killed)
    model.config.bbox_cost = 7.0   # a different save, to tell the two apart
    with pytest.raises(KeyboardInterrupt):
        save_model(accelerator, model, processor, best)
    assert {p.name: p.read_bytes() for p in best.iterdir()} == saved   # the previous best/, byte for byte
    assert (tmp_path / ".partial-best" / "model.safetensors").exists()
    assert not (tmp_path / ".partial-best" / "preprocessor_config.json").exists()
    monkeypatch.undo()
    save_model(accelerator, model, processor, best)   # the next save replaces both
    assert DetrCustomConfig.from_pretrained(best).bbox_cost == 7.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_interrupted_deletion_of_the_previous_folder_leaves_the_new_one_whole(tmp_path, monkeypatch):
    accelerator, model, processor = _one_process_tiny_model()
    best = tmp_path / "best"
    save_model(accelerator, model, processor, best)
    rmtree = shutil.rmtree

    def killed_halfway(path, *args, **kwargs):   # deletes one file of the old folder, then the process dies
        if Path(path).is_dir() and (Path(path) / "config.json").read_text().find('"bbox_cost": 7.0') < 0:
            (Path(path) / "model.safetensors").unlink()
            raise KeyboardInterrupt("killed while deleting")
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_halfway)
    model.config.bbox_cost = 7.0
    with pytest.raises(KeyboardInterrupt):
        save_model(accelerator, model, processor, best)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in best.iterdir()}
    assert DetrCustomConfig.from_pretrained(best).bbox_cost == 7.0   # the new folder, whole; the old one aside


def test_interrupted_save_model_in_a_run_leaves_no_best(tmp_path, data_dir, monkeypatch):
    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(DetrCustomImageProcessor, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(_config(tmp_path, data_dir, max_steps=2, eval_steps=2))
    run = tmp_path / "run"
    assert not (run / "best").exists() and not (run / "last").exists()
    assert (run / ".partial-best").is_dir()
    assert missing_files(run / "checkpoint-2") == []   # saved before the evaluation and its best/
