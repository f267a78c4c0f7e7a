"""A training time budget (`--max_train_minutes`): how many optimizer steps fit, measured on this machine.

The run times optimizer steps `untimed_steps + 1 .. untimed_steps + timed_steps` (the first ones pay for warm-up
allocations), then one evaluation, and picks the most steps (at most the max_steps / epochs upper bound) such that

    elapsed + (steps - done) * seconds_per_step + evaluations(steps) * eval_seconds + final_seconds <= budget

where final_seconds (the final save, pictures and model cards) is estimated as one more evaluation. The measured
steps train normally: they fall in the LR warm-up, whose factor does not depend on the total, so the schedule is the
one a run told the chosen total from step 0 follows (`timing_window` times as many of the warm-up steps as it can, up
to 20: a 3-step mean varied by tens of % between runs of the demo). The decision is part of the checkpoint
(`accelerator.register_for_checkpointing`): a resumed run keeps the sized schedule instead of measuring again.

The estimate can still be wrong (the machine gets busier, evaluations slow down as the model starts detecting), so
the run also keeps a deadline: once sized, `out_of_time()` is True when only the final evaluation and save still fit
(each estimated as one measured evaluation); the loop then stops early, saves and evaluates, and `describe()` records
the step it stopped at. A resumed run has no deadline (its budget was spent by the run it continues).
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
    total_steps: int = 0                   # the upper bound until sized, then the chosen steps
    seconds_per_step: float | None = None
    eval_seconds: float | None = None
    started: float = 0.0
    step_times: dict = field(default_factory=dict)   # global step -> clock() after it
    sized_at: int | None = None            # the step this process sized the run at (None: restored from a checkpoint)
    stopped_early_at: int | None = None    # the step the deadline stopped the run at (out_of_time)

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

    def step_done(self, global_step: int) -> bool:
        """Records the time after an optimizer step; True when enough steps are timed to size the run."""
        if self.sized:
            return False
        self.step_times[global_step] = self.clock()
        first = min(self.step_times)   # a resumed run measures from where it resumed
        return global_step - first + 1 >= self.measure_steps

    def size(self, *, global_step: int, eval_seconds: float, eval_every: int, min_steps: int) -> int:
        """Chooses total_steps from the timed steps and one evaluation's duration; min_steps: the LR warm-up."""
        last = max(self.step_times)
        start = last - self.timed_steps
        self.seconds_per_step = (self.step_times[last] - self.step_times[start]) / self.timed_steps
        self.eval_seconds = eval_seconds
        elapsed = self.clock() - self.started
        total = choose_total_steps(budget_seconds=60 * self.minutes - elapsed - eval_seconds, done=global_step,
                                   seconds_per_step=self.seconds_per_step, eval_seconds=eval_seconds,
                                   eval_every=eval_every, upper_bound=self.upper_bound)
        # too small: the warm-up does not fit, or nothing fits after the timed steps (while more were allowed)
        if total < max(min_steps, global_step) or global_step == total < self.upper_bound:
            needed = elapsed + eval_seconds + run_seconds(
                max(min_steps, global_step + 1), done=global_step, seconds_per_step=self.seconds_per_step,
                eval_seconds=eval_seconds, eval_every=eval_every)
            least = max(min_steps, global_step)
            short = (f"fewer than the {least} warm-up steps" if total < least
                     else f"no training after the {global_step} timed steps")
            raise ValueError(
                f"max_train_minutes={self.minutes:g} is too small: {self.seconds_per_step:.2f} s/step and "
                f"{eval_seconds:.1f} s per evaluation measured, {elapsed:.0f} s spent, so only {total} steps fit, "
                f"{short}. Give at least {math.ceil(needed / 6) / 10:g} minutes, or lower warmup_steps.")
        self.total_steps = total
        self.sized_at = global_step
        return total

    def out_of_time(self, global_step: int) -> bool:
        """After the step that sized the run (in this process): True, and records the step, when the time left holds
        no more than the final evaluation and save, each estimated as one measured evaluation."""
        if self.stopped_early_at is not None:
            return True
        if self.sized_at is None or global_step <= self.sized_at:   # resumed, or just sized from this clock reading
            return False
        left = 60 * self.minutes - (self.clock() - self.started)
        if global_step < self.total_steps and left <= 2 * self.eval_seconds:
            self.stopped_early_at = global_step
        return self.stopped_early_at is not None

    def describe(self) -> dict:
        """metrics.json's run.budget."""
        return {"minutes": self.minutes, "seconds_per_step": self.seconds_per_step,
                "eval_seconds": self.eval_seconds, "total_steps": self.total_steps, "upper_bound": self.upper_bound,
                "timed_steps": self.timed_steps, "stopped_early_at": self.stopped_early_at}

    # accelerate's save_state / load_state (register_for_checkpointing): the decision, not the clock readings
    def state_dict(self) -> dict:
        keep = ("seconds_per_step", "eval_seconds", "total_steps", "upper_bound")
        return {k: v for k, v in self.describe().items() if k in keep} if self.sized else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.seconds_per_step, self.eval_seconds = state["seconds_per_step"], state["eval_seconds"]
            self.total_steps = state["total_steps"]


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
