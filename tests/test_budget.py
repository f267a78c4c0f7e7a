"""The time budget (training/budget.py): its sizing arithmetic, timing window, re-planning and deadline with fake
clocks, and whole budgeted runs of the tiny training run on a simulated machine whose speed changes (re-planned to
fill the budget, resumed, stopped at the deadline)."""
import json
import math

import pytest
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


def test_a_timing_window_slowed_by_a_busy_machine_plans_at_its_fastest_step():
    clock = SetClock()
    budget = TimeBudget(1.0, upper_bound=1000, timed_steps=4, clock=clock)
    for step, seconds in enumerate([1.0, 1.0, 10.0, 10.0, 10.0, 0.5], start=1):   # busy for 30 s, then quiet
        clock.time += seconds
        budget.step_done(step)
    # 7.625 s/step measured: (N - 6) steps + 1 evaluation fit in 60 - 32.5 - 1 s -> N = 9, short of the 20-step
    # warm-up; at the fastest step's 0.5 s, N = 57: planned so, with a warning, and no error
    assert budget.size(global_step=6, eval_seconds=1.0, eval_every=1000, min_steps=20) == 57
    assert budget.seconds_per_step == 7.625 and budget.total_steps == budget.sized_total_steps == 57
    assert "only 9 steps fit, fewer than the 20 warm-up steps. The fastest timed step (0.50 s) would fit 57" in (
        budget.short_of_budget)


def test_deadline_stops_the_run_when_only_the_final_evaluation_and_save_fit():
    clock = SetClock()
    budget, step, total = _sized_budget(clock)
    # 11 s spent, 5 s an evaluation (one now, one at the end, one reserved for the final save): 60 - 11 - 10 = 39 s
    # for (N - 22) * 0.5 s -> N = 100
    assert total == 100 and not budget.out_of_time(step)
    clock.time = 49.5                       # 10.5 s left: one more step (0.5 s), the final evaluation and save fit
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

    # as test_train's budgeted run: 1 s a reading sizes 10 steps into 0.25 min at step 5; from the 11th reading (the
    # first deadline check, at step 6, after the step's own reading) each reading is 3 s: at step 7 no time is left
    # for one more step (1 s) and the final evaluation and save (2 x 1 s). No logging step, so no re-planning: the
    # deadline alone stops it.
    monkeypatch.setattr(budget, "now", SlowingClock(1.0, readings=10, slow=3.0))
    with caplog.at_level("WARNING"):
        _run(_config(tmp_path, data_dir, max_steps=50, eval_steps=100, save_steps=100, lr_scheduler_type="cosine",
                     warmup_steps=5, seed=5, max_train_minutes=0.25, logging_steps=100))
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

    # logging_steps: no re-planning (test_a_slow_start_is_re_planned_to_fill_the_budget has it)
    common = dict(max_steps=50, eval_steps=100, save_steps=6, save_total_limit=3, lr_scheduler_type="cosine",
                  warmup_steps=5, seed=5, logging_steps=100)
    SimulatedMachine(lambda n: 1.0, eval_seconds=1.0).install(monkeypatch)
    # 1 s a step and an evaluation: 6 s spent at sizing (5 steps, the timing evaluation), 1 s reserved for the
    # final save: (N - 5) steps + 1 final evaluation fit in 15 s - 6 s - 1 s -> N = 12
    with caplog.at_level("INFO"):
        _run(_config(tmp_path / "budget", data_dir, max_train_minutes=0.25, **common))
    assert any("1.00 s/step and 1.0 s per evaluation measured, 12 steps fit in 0.25 min" in r.getMessage()
               for r in caplog.records)
    metrics = json.loads((tmp_path / "budget" / "run" / "metrics.json").read_text())
    assert metrics["run"]["budget"] == {"minutes": 0.25, "seconds_per_step": 1.0, "eval_seconds": 1.0,
                                        "total_steps": 12, "upper_bound": 50, "timed_steps": 3,
                                        "sized_total_steps": 12, "replans": 0, "stopped_early_at": None}
    assert metrics["run"]["global_steps"] == 12
    # the schedule is the one of a run told 12 steps from step 0 (the timed steps are in the warm-up)
    _run(_config(tmp_path / "plain", data_dir, **{**common, "max_steps": 12}))
    assert _same_weights(_weights(tmp_path / "budget" / "run"), _weights(tmp_path / "plain" / "run"))
    # resumed with a much slower clock: the checkpoint's sizing holds
    monkeypatch.setattr(budget, "now", FakeClock(100.0))
    _run(_config(tmp_path / "resumed", data_dir, max_train_minutes=0.25, **common,
                 resume_from_checkpoint=str(tmp_path / "budget" / "run" / "checkpoint-6")))
    resumed = json.loads((tmp_path / "resumed" / "run" / "metrics.json").read_text())
    assert resumed["run"]["budget"]["total_steps"] == 12 and resumed["run"]["global_steps"] == 12
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


def _cosine_factor(budget, step, warmup):
    return 0.5 * (1.0 + math.cos(math.pi * budget.cosine_progress(step, warmup)))


def test_a_new_plan_keeps_the_learning_rate_continuous_and_ends_the_cosine_at_the_new_total():
    clock = SetClock()
    budget, step, total = _sized_budget(clock)           # 100 steps planned at step 22, 0.5 s/step, warm-up 10
    assert budget.cosine_progress(55, 10) == (55 - 10) / (100 - 10)   # no plan yet: the usual cosine
    clock.time += 5.0                                      # the timing evaluation
    for step in range(23, 61):                             # the steps get faster: 0.25 s from step 23
        clock.time += 0.25
        budget.step_done(step)
    before = _cosine_factor(budget, 60, 10)
    assert budget.replan(global_step=60, eval_every=1000, warmup_steps=10) > 100 and budget.replans == 1
    assert budget.seconds_per_step == 0.25 and budget.anchor_step == 60
    assert _cosine_factor(budget, 60, 10) == pytest.approx(before, abs=1e-12)   # no jump
    assert budget.cosine_progress(budget.total_steps, 10) == pytest.approx(1.0)
    factors = [_cosine_factor(budget, s, 10) for s in range(60, budget.total_steps + 1)]
    assert factors == sorted(factors, reverse=True) and factors[-1] == pytest.approx(0.0)
    # a plan made in the warm-up changes only the total
    warm = TimeBudget(1.0, upper_bound=1000, timed_steps=3, clock=clock)
    warm.sized_at = warm.planned_at = 5
    warm.seconds_per_step = warm.eval_seconds = 0.5
    warm.step_seconds = {s: 0.5 for s in range(1, 9)}
    warm.replan(global_step=8, eval_every=1000, warmup_steps=10)
    assert warm.anchor_step is None and warm.anchor_progress == 0.0
    # the plan, anchor included, is what a checkpoint keeps
    restored = TimeBudget(1.0, upper_bound=1000, clock=clock)
    restored.load_state_dict(budget.state_dict())
    assert [restored.cosine_progress(s, 10) for s in (60, 80, budget.total_steps)] == [
        budget.cosine_progress(s, 10) for s in (60, 80, budget.total_steps)]
    # a checkpoint saved before re-planning existed: its plan had no anchor
    restored.load_state_dict({"seconds_per_step": 0.5, "eval_seconds": 1.0, "total_steps": 80, "upper_bound": 100})
    assert restored.anchor_step is None and restored.cosine_progress(45, 10) == 0.5


class SimulatedMachine:
    """A clock that only the work moves: each optimizer step costs `step_seconds(n)` (n: its number in this process),
    each evaluation `eval_seconds`. Reading it costs nothing."""

    def __init__(self, step_seconds, eval_seconds: float):
        self.time, self.steps, self.step_seconds, self.eval_seconds = 0.0, 0, step_seconds, eval_seconds

    def __call__(self) -> float:
        return self.time

    def install(self, monkeypatch):
        from training import budget, train

        train_step, evaluate = train.train_step, train.evaluate

        def timed_step(*args, **kwargs):
            self.steps += 1
            self.time += self.step_seconds(self.steps)
            return train_step(*args, **kwargs)

        def timed_evaluate(*args, **kwargs):
            self.time += self.eval_seconds
            return evaluate(*args, **kwargs)

        monkeypatch.setattr(budget, "now", self)
        monkeypatch.setattr(train, "train_step", timed_step)
        monkeypatch.setattr(train, "evaluate", timed_evaluate)
        return self


def _learning_rates(run_dir):
    return [r["lr"] for r in json.loads((run_dir / "metrics.json").read_text())["train_history"]]


BUDGETED = dict(max_steps=60, eval_steps=100, lr_scheduler_type="cosine", warmup_steps=5, seed=5,
                max_train_minutes=1, logging_steps=1)


def test_a_slow_start_is_re_planned_to_fill_the_budget_and_resumes_with_its_plan(tmp_path, data_dir, monkeypatch):
    # a machine busy for its first 10 steps (4 s each), then quiet (1 s); 2 s an evaluation; 60 s in all. Sized at
    # step 5 (22 s spent: 20 s of steps, the timing evaluation) to 13 steps; from step 11 each logging step plans
    # again with the last 3 steps' mean (3 s, 2 s, then 1 s): 15, 18, then 24 steps, where the plan stays. Step 24
    # at 56 s, its evaluation until 58 s.
    machine = SimulatedMachine(lambda n: 4.0 if n <= 10 else 1.0, eval_seconds=2.0).install(monkeypatch)
    _run(_config(tmp_path / "busy", data_dir, save_steps=10, save_total_limit=3, **BUDGETED))
    run = json.loads((tmp_path / "busy" / "run" / "metrics.json").read_text())["run"]
    assert run["budget"]["sized_total_steps"] == 13 and run["budget"]["replans"] == 3
    assert run["global_steps"] == run["budget"]["total_steps"] == 24 and run["budget"]["stopped_early_at"] is None
    assert 55 <= machine.time <= 60                      # the budget used, and not overrun
    lrs = _learning_rates(tmp_path / "busy" / "run")[5:]   # after the warm-up: no jump up, down to 0 at the end
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == 0.0
    # sized once (as before re-planning), the run would have stopped at step 13 with 15 s of its budget left
    # resumed after the last plan, on a machine 100x slower: the checkpoint's plan holds, with the same weights
    monkeypatch.setattr(SimulatedMachine, "__call__", lambda self: self.time * 100)
    _run(_config(tmp_path / "resumed", data_dir, save_steps=10, save_total_limit=3, **BUDGETED,
                 resume_from_checkpoint=str(tmp_path / "busy" / "run" / "checkpoint-20")))
    resumed = json.loads((tmp_path / "resumed" / "run" / "metrics.json").read_text())["run"]
    assert resumed["global_steps"] == resumed["budget"]["total_steps"] == 24
    assert _same_weights(_weights(tmp_path / "busy" / "run"), _weights(tmp_path / "resumed" / "run"))


def test_a_fast_start_then_a_busy_machine_ends_within_the_budget(tmp_path, data_dir, monkeypatch):
    # quiet for 10 steps (1 s each), then busy (4 s): sized at step 5 to 54 steps (7 s spent), then planned again
    # down to 31, 24 and 21 steps as the slow steps come in. Step 21 at 56 s, its evaluation until 58 s.
    machine = SimulatedMachine(lambda n: 1.0 if n <= 10 else 4.0, eval_seconds=2.0).install(monkeypatch)
    _run(_config(tmp_path, data_dir, save_steps=100, **BUDGETED))
    run = json.loads((tmp_path / "run" / "metrics.json").read_text())["run"]
    assert run["budget"]["sized_total_steps"] == 54 and run["global_steps"] == run["budget"]["total_steps"] == 21
    assert 55 <= machine.time <= 60
    lrs = _learning_rates(tmp_path / "run")[5:]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == 0.0
