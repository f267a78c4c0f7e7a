"""A training time budget (`--max_train_minutes`): how many optimizer steps fit, measured on this machine.

The run times optimizer steps `untimed_steps + 1 .. untimed_steps + timed_steps` (the first ones pay for warm-up
allocations), then one evaluation, and picks the most steps (at most the max_steps / epochs upper bound) such that

    elapsed + (steps - done) * seconds_per_step + evaluations(steps) * eval_seconds + final_seconds <= budget

where final_seconds (the final save, pictures and model cards) is estimated as one more evaluation. The measured
steps train normally: they fall in the LR warm-up, whose factor does not depend on the total, so the schedule is the
one a run told the chosen total from step 0 follows. The decision is part of the checkpoint
(`accelerator.register_for_checkpointing`): a resumed run keeps the sized schedule instead of measuring again.
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

    def __post_init__(self):
        if self.minutes <= 0:
            raise ValueError(f"max_train_minutes={self.minutes}: give a positive number of minutes.")
        self.clock = self.clock or now
        self.started = self.clock()   # the run's start: loading data and building count too
        self.set_upper_bound(self.upper_bound)

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
        if total < max(min_steps, global_step):
            needed = elapsed + eval_seconds + run_seconds(
                max(min_steps, global_step + 1), done=global_step, seconds_per_step=self.seconds_per_step,
                eval_seconds=eval_seconds, eval_every=eval_every)
            raise ValueError(
                f"max_train_minutes={self.minutes:g} is too small: {self.seconds_per_step:.2f} s/step and "
                f"{eval_seconds:.1f} s per evaluation measured, {elapsed:.0f} s spent, so only {total} steps fit, "
                f"fewer than the {max(min_steps, global_step)} warm-up steps. Give at least "
                f"{math.ceil(needed / 6) / 10:g} minutes, or lower warmup_steps.")
        self.total_steps = total
        return total

    def describe(self) -> dict:
        """metrics.json's run.budget."""
        return {"minutes": self.minutes, "seconds_per_step": self.seconds_per_step,
                "eval_seconds": self.eval_seconds, "total_steps": self.total_steps, "upper_bound": self.upper_bound}

    # accelerate's save_state / load_state (register_for_checkpointing): the decision, not the clock readings
    def state_dict(self) -> dict:
        return {k: v for k, v in self.describe().items() if k != "minutes"} if self.sized else {}

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
