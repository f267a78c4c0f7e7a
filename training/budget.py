"""A training time budget (`--max_train_minutes`): how many optimizer steps fit, measured on this machine as the run
goes.

Sizing. The run times optimizer steps `untimed_steps + 1 .. untimed_steps + timed_steps` (the first ones pay for
warm-up allocations), then one evaluation, and picks the most steps (at most the max_steps / epochs upper bound) such
that

    elapsed + (steps - done) * seconds_per_step + evaluations(steps) * eval_seconds + final_seconds <= budget

where final_seconds (the final save, pictures and model cards) is estimated as one more evaluation. The measured
steps train normally: they fall in the LR warm-up, whose factor does not depend on the total.

Re-planning. A machine's speed changes while the run trains (other work comes and goes), so the run plans again at
every logging step: seconds_per_step becomes the mean of the recent steps (the last `timed_steps`, or all since the
previous plan if more), eval_seconds the last evaluation's duration (with the checkpoint saved before it), and the
same inequality gives a new total from the time left. A slow first minute then costs only its own steps: once the
steps are fast again, the plan grows to fill the budget (and shrinks when they slow down). The cosine schedule stays
continuous across plans: a plan made at step s keeps the schedule's progress p(s) there and spreads the rest,
1 - p(s), over the steps s .. total, so the learning rate never jumps, and it reaches its end at the planned last
step. Plans made during the warm-up only set the total (the warm-up factor does not depend on it).

A deadline guards the last stretch: after sizing, `out_of_time()` is True when one more step and then the final
evaluation and save (each estimated as one measured evaluation) no longer fit; the loop then stops early, saves and
evaluates, and `describe()` records the step it stopped at.

The plan (total, seconds_per_step, eval_seconds, and the schedule's anchor) is part of the checkpoint
(`accelerator.register_for_checkpointing`): a resumed run follows the saved plan to its end, with the same learning
rates, without timing or re-planning (its budget was spent by the run it continues).
"""
import math
import time
from dataclasses import dataclass, field
from typing import Callable


def now() -> float:
    """The budget's default clock (tests replace it)."""
    return time.monotonic()


@dataclass
class TimeBudget:
    minutes: float
    upper_bound: int = 0                   # max_steps, or the epochs' steps: never more than this (set_upper_bound)
    untimed_steps: int = 2
    timed_steps: int = 3
    clock: Callable[[], float] | None = None
    total_steps: int = 0                   # the upper bound until sized, then the planned steps
    seconds_per_step: float | None = None  # the latest plan's estimate
    eval_seconds: float | None = None      # the latest evaluation's duration
    started: float = 0.0
    step_seconds: dict = field(default_factory=dict)   # global step -> its duration (evaluations left out)
    sized_total_steps: int | None = None   # the first plan's total (metrics.json: how much re-planning moved it)
    sized_at: int | None = None            # the step this process sized the run at (None: restored from a checkpoint)
    planned_at: int | None = None          # the step of the latest plan
    replans: int = 0                       # plans that changed the total
    stopped_early_at: int | None = None    # the step the deadline stopped the run at (out_of_time)
    short_of_budget: str | None = None     # size(): the warm-up did not fit the measured speed (a warning)
    # the cosine schedule's anchor: its progress (0 .. 1 after the warm-up) at anchor_step; None: from the warm-up
    anchor_step: int | None = None
    anchor_progress: float = 0.0
    _first_step: int | None = None         # the first step this process ran (a resumed run's is not 1)
    _last_reading: float | None = None     # clock() after the previous step
    _paused: float = 0.0                   # seconds since then spent evaluating (not part of the next step)

    def __post_init__(self):
        if self.minutes <= 0:
            raise ValueError(f"max_train_minutes={self.minutes}: give a positive number of minutes.")
        self.clock = self.clock or now
        self.started = self.clock()   # the run's start: loading data and building count too
        self.set_upper_bound(self.upper_bound)

    @staticmethod
    def timing_window(warmup_steps: int, untimed_steps: int = 2, most: int = 20) -> int:
        """How many steps to time: as many of the LR warm-up's steps after the untimed ones as fit, at least 3 and
        at most `most` (a longer window averages out the step-to-step noise of a busy machine)."""
        return max(3, min(most, warmup_steps - untimed_steps))

    def set_upper_bound(self, upper_bound: int) -> None:
        self.upper_bound = self.total_steps = upper_bound

    @property
    def measure_steps(self) -> int:
        """The optimizer steps done before sizing: they must fall in the LR warm-up of a cosine schedule."""
        return self.untimed_steps + self.timed_steps

    @property
    def sized(self) -> bool:
        return self.seconds_per_step is not None

    @property
    def seconds_left(self) -> float:
        return 60 * self.minutes - (self.clock() - self.started)

    def step_done(self, global_step: int) -> bool:
        """Records the step's duration; True at the step where enough steps are timed to size the run."""
        reading = self.clock()
        if self._last_reading is None:
            self._first_step = global_step   # a resumed run measures from where it resumed
        else:
            self.step_seconds[global_step] = reading - self._last_reading - self._paused
        self._last_reading, self._paused = reading, 0.0
        return not self.sized and global_step - self._first_step + 1 >= self.measure_steps

    def evaluated(self, seconds: float) -> None:
        """An evaluation (with the checkpoint saved before it) took `seconds`: the next plans count that much per
        evaluation, and the next step's duration leaves it out."""
        self.eval_seconds = seconds
        self._paused += seconds

    def _recent_seconds_per_step(self, window: int) -> float:
        recent = sorted(self.step_seconds)[-window:]
        return sum(self.step_seconds[s] for s in recent) / len(recent)

    def _fit(self, seconds_left: float, *, global_step: int, eval_every: int) -> int:
        """The most steps whose remaining steps and evaluations fit in seconds_left, less the final save."""
        return choose_total_steps(budget_seconds=seconds_left - self.eval_seconds, done=global_step,
                                  seconds_per_step=self.seconds_per_step, eval_seconds=self.eval_seconds,
                                  eval_every=eval_every, upper_bound=self.upper_bound)

    def size(self, *, global_step: int, eval_seconds: float, eval_every: int, min_steps: int) -> int:
        """Chooses total_steps from the timed steps and one evaluation's duration; min_steps: the LR warm-up.

        When the warm-up does not fit at the measured speed but would at the fastest timed step's (a machine busy
        while the run was timed), the run is planned at that speed and `short_of_budget` says so: the next plans
        shorten it if the steps stay slow, and the deadline ends it in time. When it would not fit even then,
        a ValueError names the minutes needed."""
        timed = sorted(self.step_seconds)[-self.timed_steps:]
        self.seconds_per_step = self._recent_seconds_per_step(self.timed_steps)
        self.evaluated(eval_seconds)
        seconds_left = self.seconds_left
        elapsed = 60 * self.minutes - seconds_left
        total = self._fit(seconds_left, global_step=global_step, eval_every=eval_every)
        least = max(min_steps, global_step)

        def too_small(steps: int) -> bool:   # the warm-up does not fit, or nothing after the timed steps (if allowed)
            return steps < least or global_step == steps < self.upper_bound

        if too_small(total):
            needed = elapsed + eval_seconds + run_seconds(
                max(min_steps, global_step + 1), done=global_step, seconds_per_step=self.seconds_per_step,
                eval_seconds=eval_seconds, eval_every=eval_every)
            short = (f"fewer than the {least} warm-up steps" if total < least
                     else f"no training after the {global_step} timed steps")
            message = (f"max_train_minutes={self.minutes:g} is too small: {self.seconds_per_step:.2f} s/step and "
                       f"{eval_seconds:.1f} s per evaluation measured, {elapsed:.0f} s spent, so only {total} steps "
                       f"fit, {short}.")
            fastest = min(self.step_seconds[s] for s in timed)
            optimistic = choose_total_steps(budget_seconds=seconds_left - eval_seconds, done=global_step,
                                            seconds_per_step=fastest, eval_seconds=eval_seconds,
                                            eval_every=eval_every, upper_bound=self.upper_bound)
            if too_small(optimistic):
                raise ValueError(f"{message} Give at least {math.ceil(needed / 6) / 10:g} minutes, or lower "
                                 "warmup_steps.")
            self.short_of_budget = (f"{message} The fastest timed step ({fastest:.2f} s) would fit {optimistic}: "
                                    "planned at that speed, and planned again as the run goes (a busy machine?). If "
                                    f"the steps stay this slow, the run ends at its deadline, within the warm-up; "
                                    f"{math.ceil(needed / 6) / 10:g} minutes would fit it.")
            total = optimistic   # planned at that speed: the next plans and the deadline correct it
        self.total_steps = self.sized_total_steps = total
        self.sized_at = self.planned_at = global_step
        return total

    def replan(self, *, global_step: int, eval_every: int, warmup_steps: int) -> int:
        """After sizing, in this process: plans again from the recent steps' speed and the time left. Keeps the
        cosine schedule continuous at this step (see cosine_progress). Returns the new total, at least global_step
        (global_step itself: nothing more fits, the run ends here)."""
        assert self.sized_at is not None and global_step > self.planned_at, "replan after size, once per step"
        self.seconds_per_step = self._recent_seconds_per_step(max(self.timed_steps, global_step - self.planned_at))
        total = self._fit(self.seconds_left, global_step=global_step, eval_every=eval_every)
        if total != self.total_steps:
            if global_step > warmup_steps:   # in the warm-up the schedule does not depend on the total yet
                self.anchor_progress = self.cosine_progress(global_step, warmup_steps)
                self.anchor_step = global_step
            self.total_steps = total
            self.replans += 1
        self.planned_at = global_step
        return total

    def cosine_progress(self, step: int, warmup_steps: int) -> float:
        """The cosine schedule's progress after the warm-up, 0 at warmup_steps and 1 at total_steps: linear between
        the anchor (the last plan that changed the total) and the total. Without an anchor it is the usual
        (step - warmup_steps) / (total_steps - warmup_steps)."""
        start = warmup_steps if self.anchor_step is None else self.anchor_step
        fraction = float(step - start) / float(max(1, self.total_steps - start))
        return self.anchor_progress + (1.0 - self.anchor_progress) * fraction

    def out_of_time(self, global_step: int) -> bool:
        """After the step that sized the run (in this process): True, and records the step, when the time left is
        less than one more step and the final evaluation and save (each estimated as one measured evaluation)."""
        if self.stopped_early_at is not None:
            return True
        if self.sized_at is None or global_step <= self.sized_at:   # resumed, or just sized from this clock reading
            return False
        if global_step < self.total_steps and self.seconds_left < self.seconds_per_step + 2 * self.eval_seconds:
            self.stopped_early_at = global_step
        return self.stopped_early_at is not None

    def describe(self) -> dict:
        """metrics.json's run.budget."""
        return {"minutes": self.minutes, "seconds_per_step": self.seconds_per_step,
                "eval_seconds": self.eval_seconds, "total_steps": self.total_steps, "upper_bound": self.upper_bound,
                "timed_steps": self.timed_steps, "sized_total_steps": self.sized_total_steps,
                "replans": self.replans, "stopped_early_at": self.stopped_early_at}

    # accelerate's save_state / load_state (register_for_checkpointing): the plan, not the clock readings
    def state_dict(self) -> dict:
        if not self.sized:
            return {}
        keep = ("seconds_per_step", "eval_seconds", "total_steps", "upper_bound", "sized_total_steps", "replans")
        return {**{k: v for k, v in self.describe().items() if k in keep},
                "anchor_step": self.anchor_step, "anchor_progress": self.anchor_progress}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.seconds_per_step, self.eval_seconds = state["seconds_per_step"], state["eval_seconds"]
            self.total_steps = state["total_steps"]
            # checkpoints written before re-planning have neither: their plan had no anchor
            self.sized_total_steps = state.get("sized_total_steps", self.total_steps)
            self.replans = state.get("replans", 0)
            self.anchor_step, self.anchor_progress = state.get("anchor_step"), state.get("anchor_progress", 0.0)


def run_seconds(total: int, *, done: int, seconds_per_step: float, eval_seconds: float, eval_every: int) -> float:
    """Seconds from step `done` to step `total`: the steps and the evaluations (every eval_every, and at the end)."""
    evaluations = math.ceil(total / eval_every) - done // eval_every
    return (total - done) * seconds_per_step + evaluations * eval_seconds


def choose_total_steps(*, budget_seconds: float, done: int, seconds_per_step: float, eval_seconds: float,
                       eval_every: int, upper_bound: int) -> int:
    """The most steps in [done, upper_bound] whose remaining steps and evaluations fit in budget_seconds."""
    for total in range(upper_bound, done, -1):
        if run_seconds(total, done=done, seconds_per_step=seconds_per_step, eval_seconds=eval_seconds,
                       eval_every=eval_every) <= budget_seconds:
            return total
    return done
