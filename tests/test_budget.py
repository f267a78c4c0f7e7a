"""The time budget (training/budget.py): its sizing arithmetic, timing window and deadline with fake clocks, and
whole budgeted runs of the tiny training run (sized, resumed, stopped at the deadline)."""
import json

import pytest
from tiny_run import histories as _histories
from tiny_run import last_weights as _weights
from tiny_run import run as _run
from tiny_run import same_weights as _same_weights
from tiny_run import write_config as _config

from training.budget import TimeBudget


class SetClock:
    def __init__(self):
        self.time = 0.0

    def __call__(self) -> float:
        return self.time


def test_timing_window_uses_the_warmup():
    assert TimeBudget.timing_window(5) == 3            # the smallest warm-up a cosine budget accepts: 2 + 3
    assert TimeBudget.timing_window(12) == 10
    assert TimeBudget.timing_window(100) == 20         # the demo's warm-up: 20 timed steps, not 3
    assert TimeBudget.timing_window(100, most=50) == 50


def _sized_budget(clock, *, timed_steps=20, eval_seconds=5.0):
    budget = TimeBudget(1.0, upper_bound=1000, timed_steps=timed_steps, clock=clock)
    step = 0
    while True:   # 0.5 s per step; untimed steps first
        step += 1
        clock.time += 0.5
        if budget.step_done(step):
            break
    assert step == 2 + timed_steps
    total = budget.size(global_step=step, eval_seconds=eval_seconds, eval_every=1000, min_steps=step)
    return budget, step, total


def test_the_mean_over_the_window_sizes_the_run():
    clock = SetClock()
    budget = TimeBudget(1.0, upper_bound=1000, timed_steps=4, clock=clock)
    for step, seconds in enumerate([9.0, 9.0, 0.5, 0.7, 0.3, 0.5], start=1):   # two slow warm-up steps, then ~0.5 s
        clock.time += seconds
        sized = budget.step_done(step)
    assert sized and budget.size(global_step=6, eval_seconds=1.0, eval_every=1000, min_steps=6) > 0
    assert budget.seconds_per_step == pytest.approx(0.5)   # the untimed steps are left out of the mean
    assert budget.describe()["timed_steps"] == 4


def test_deadline_stops_the_run_when_only_the_final_evaluation_and_save_fit():
    clock = SetClock()
    budget, step, total = _sized_budget(clock)
    # 11 s spent, 5 s an evaluation (one now, one at the end, one reserved for the final save): 60 - 11 - 10 = 39 s
    # for (N - 22) * 0.5 s -> N = 100
    assert total == 100 and not budget.out_of_time(step)
    clock.time = 49.9                       # 10.1 s left: more than the final evaluation and save need
    assert not budget.out_of_time(60)
    clock.time = 50.0                       # the machine got slower: at step 61 only 10 s are left
    assert budget.out_of_time(61) and budget.stopped_early_at == 61
    assert budget.out_of_time(62) and budget.stopped_early_at == 61   # stays decided
    assert budget.describe()["stopped_early_at"] == 61 and budget.describe()["total_steps"] == 100


def test_no_deadline_when_on_time_or_resumed():
    clock = SetClock()
    budget, step, total = _sized_budget(clock)
    clock.time = 59.0                      # the last step is reached in time: nothing to stop
    assert not budget.out_of_time(total)
    restored = TimeBudget(1.0, upper_bound=1000, clock=clock)
    restored.load_state_dict(budget.state_dict())
    clock.time = 1e6                        # a resumed run: its budget was the first run's
    assert restored.total_steps == 100 and not restored.out_of_time(50)
    assert "stopped_early_at" not in budget.state_dict()   # the checkpoint holds the decision, not the clock's verdict


class SlowingClock:
    """Ticks `tick` seconds a reading for the first `readings` readings, then `slow` seconds: a machine that gets
    busier after the run was sized."""

    def __init__(self, tick: float, readings: int, slow: float):
        self.time, self.tick, self.readings, self.slow, self.count = 0.0, tick, readings, slow, 0

    def __call__(self) -> float:
        self.count += 1
        self.time += self.tick if self.count <= self.readings else self.slow
        return self.time


def test_a_run_that_slows_down_stops_at_the_deadline_and_saves(tmp_path, data_dir, monkeypatch, caplog):
    from training import budget

    # as test_train's budgeted run: 1 s a reading sizes 10 steps into 0.25 min at step 5; from the 10th reading (the
    # first deadline check, at step 6) each reading is 3 s: at step 7 only 1 s is left, less than the final
    # evaluation and save need (2 x 1 s)
    monkeypatch.setattr(budget, "now", SlowingClock(1.0, readings=9, slow=3.0))
    with caplog.at_level("WARNING"):
        _run(_config(tmp_path, data_dir, max_steps=50, eval_steps=100, save_steps=100, lr_scheduler_type="cosine",
                     warmup_steps=5, seed=5, max_train_minutes=0.25))
    assert any("time budget: stopping at step 7 of 10" in r.getMessage() for r in caplog.records)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["run"]["global_steps"] == 7
    assert metrics["run"]["budget"]["stopped_early_at"] == 7 and metrics["run"]["budget"]["total_steps"] == 10
    assert [e["step"] for e in metrics["eval_history"]] == [7]     # the final evaluation ran
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-7").is_dir()             # and the checkpoint a resume would start from


class FakeClock:
    def __init__(self, tick: float):
        self.time, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.time += self.tick
        return self.time


def test_budget_sizing_math():
    from training.budget import TimeBudget, choose_total_steps, run_seconds

    # 10 s/step, an evaluation every 4 steps and at the end (20 s each): steps 2..7 = 50 s + 2 evaluations
    assert run_seconds(7, done=2, seconds_per_step=10, eval_seconds=20, eval_every=4) == 50 + 40
    assert choose_total_steps(budget_seconds=90, done=2, seconds_per_step=10, eval_seconds=20, eval_every=4,
                              upper_bound=100) == 7
    assert choose_total_steps(budget_seconds=1e6, done=2, seconds_per_step=10, eval_seconds=20, eval_every=4,
                              upper_bound=100) == 100
    budget = TimeBudget(1.0, upper_bound=1000, clock=FakeClock(0.5))   # clock: 0.5 at creation
    assert [budget.step_done(step) for step in range(1, 6)] == [False] * 4 + [True]   # 2 untimed + 3 timed
    # elapsed at sizing: 3.5 - 0.5 = 3 s; 0.5 s/step; 2 s an evaluation, reserved once more for the final save
    total = budget.size(global_step=5, eval_seconds=2.0, eval_every=10, min_steps=5)
    assert budget.seconds_per_step == 0.5 and total == choose_total_steps(
        budget_seconds=60 - 3 - 2, done=5, seconds_per_step=0.5, eval_seconds=2.0, eval_every=10, upper_bound=1000)
    # (N - 5) * 0.5 s + ceil(N / 10) evaluations * 2 s <= 55 s: N = 80 (53.5 s); 81 would take 56 s
    assert total == 80 and budget.describe()["total_steps"] == 80
    restored = TimeBudget(1.0, upper_bound=1000, clock=FakeClock(99.0))
    restored.load_state_dict(budget.state_dict())
    assert restored.total_steps == 80 and not restored.step_done(6)
    small = TimeBudget(0.1, upper_bound=1000, clock=FakeClock(0.5))   # 6 s: 3 s spent, 2 s for the final save
    for step in range(1, 6):
        small.step_done(step)
    with pytest.raises(ValueError, match=r"too small: 0\.50 s/step .* fewer than the 50 warm-up steps\. Give at "
                                         r"least 0\.7 minutes"):
        small.size(global_step=5, eval_seconds=2.0, eval_every=10, min_steps=50)


def test_time_budget_sizes_the_run_and_resume_keeps_it(tmp_path, data_dir, monkeypatch, caplog):
    from training import budget

    common = dict(max_steps=50, eval_steps=100, save_steps=6, save_total_limit=3, lr_scheduler_type="cosine",
                  warmup_steps=5, seed=5)
    monkeypatch.setattr(budget, "now", FakeClock(1.0))
    # 1 s a clock reading: creation, 5 timed steps, an evaluation (1 s); 9 s elapsed at sizing, 1 s reserved for
    # the final save: (N - 5) steps + 1 final evaluation fit in 15 s - 9 s - 1 s -> N = 10
    with caplog.at_level("INFO"):
        _run(_config(tmp_path / "budget", data_dir, max_train_minutes=0.25, **common))
    assert any("1.00 s/step and 1.0 s per evaluation measured, 10 steps fit in 0.25 min" in r.getMessage()
               for r in caplog.records)
    metrics = json.loads((tmp_path / "budget" / "run" / "metrics.json").read_text())
    assert metrics["run"]["budget"] == {"minutes": 0.25, "seconds_per_step": 1.0, "eval_seconds": 1.0,
                                        "total_steps": 10, "upper_bound": 50, "timed_steps": 3,
                                        "stopped_early_at": None}
    assert metrics["run"]["global_steps"] == 10
    # the schedule is the one of a run told 10 steps from step 0 (the timed steps are in the warm-up)
    _run(_config(tmp_path / "plain", data_dir, **{**common, "max_steps": 10}))
    assert _histories(tmp_path / "budget" / "run")[0] == _histories(tmp_path / "plain" / "run")[0]
    # resumed with a much slower clock: the checkpoint's sizing holds
    monkeypatch.setattr(budget, "now", FakeClock(100.0))
    _run(_config(tmp_path / "resumed", data_dir, max_train_minutes=0.25, **common,
                 resume_from_checkpoint=str(tmp_path / "budget" / "run" / "checkpoint-6")))
    resumed = json.loads((tmp_path / "resumed" / "run" / "metrics.json").read_text())
    assert resumed["run"]["budget"]["total_steps"] == 10 and resumed["run"]["global_steps"] == 10
    assert _same_weights(_weights(tmp_path / "budget" / "run"), _weights(tmp_path / "resumed" / "run"))
    # too small for the warm-up: a clear error
    monkeypatch.setattr(budget, "now", FakeClock(1.0))
    with pytest.raises(ValueError, match="max_train_minutes=0.1 is too small.*Give at least"):
        _run(_config(tmp_path / "small", data_dir, max_train_minutes=0.1, **{**common, "warmup_steps": 20}))
    with pytest.raises(ValueError, match="cosine schedule needs warmup_steps >= 5"):
        _run(_config(tmp_path / "short_warmup", data_dir, max_train_minutes=1, **{**common, "warmup_steps": 2}))


def test_warmup_fits_the_run_and_a_short_run_is_not_timed():
    from training.arguments import TrainArguments
    from training.build import budget_for_run, fit_warmup

    assert fit_warmup(100, 1900) == 100 and fit_warmup(100, 30) == 15 and fit_warmup(100, 2) == 1
    args = TrainArguments(lr_scheduler_type="cosine", warmup_steps=fit_warmup(100, 30), max_train_minutes=9)
    budget = TimeBudget(9, timed_steps=TimeBudget.timing_window(args.warmup_steps))
    assert budget_for_run(budget, args, 30) is budget and budget.measure_steps <= args.warmup_steps
    args.warmup_steps = fit_warmup(100, 4)
    assert budget_for_run(TimeBudget(9, timed_steps=TimeBudget.timing_window(2)), args, 4) is None
