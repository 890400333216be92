"""Sample-budget accounting shared by SD-Zero and every baseline.

One `Budget` per training run counts what the method spent:

    questions        distinct training questions that were sampled on
    generations      sampled responses (first answers, revisions, rollouts)
    sampled_tokens   tokens in those responses
    trained_tokens   tokens (prompt + response, no padding) that went through a forward AND a backward
                     pass of the trained model; forward-only passes (teacher, reference) are not counted
    wall_seconds     wall time of the method, without the learning-curve evaluations made along the way

`record()` gives the counters as `budget/...` fields for one line of metrics.jsonl; `summary()` the
same without the prefix, for reports.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from sdzero.errors import Refusal


@dataclass
class Budget:
    generations: int = 0
    sampled_tokens: int = 0
    trained_tokens: int = 0
    question_ids: set = field(default_factory=set)
    excluded_seconds: float = 0.0
    """Time spent in `excluded()` blocks (evaluations), left out of wall_seconds."""
    start: float = field(default_factory=time.time)

    def sampled(self, question_ids: list, response_lengths: list[int]) -> None:
        """One sampled response per entry: the question it answers and its length in tokens."""
        if len(question_ids) != len(response_lengths):
            raise Refusal(f"{len(question_ids)} question ids for {len(response_lengths)} responses")
        self.question_ids.update(question_ids)
        self.generations += len(response_lengths)
        self.sampled_tokens += sum(response_lengths)

    def trained(self, tokens: int) -> None:
        self.trained_tokens += tokens

    @contextmanager
    def excluded(self):
        """Time inside this block (e.g. a learning-curve evaluation) does not count as the method's."""
        begin = time.time()
        try:
            yield
        finally:
            self.excluded_seconds += time.time() - begin

    @property
    def wall_seconds(self) -> float:
        return time.time() - self.start - self.excluded_seconds

    def summary(self) -> dict:
        return {"questions": len(self.question_ids), "generations": self.generations,
                "sampled_tokens": self.sampled_tokens, "trained_tokens": self.trained_tokens,
                "wall_seconds": round(self.wall_seconds, 2)}

    def record(self) -> dict:
        return {f"budget/{key}": value for key, value in self.summary().items()}


def relative_gap(actual: float, target: float) -> float:
    """|actual - target| / target: how far a method's budget is from the matched one."""
    if target <= 0:
        raise Refusal(f"the target budget must be positive, got {target}")
    return abs(actual - target) / target


class LearningCurve:
    """Accuracy against generations spent and wall time billed, evaluated along a run; the evaluations
    are not billed."""

    def __init__(self, budget: Budget, evaluate_fn=None):
        self.budget, self.evaluate_fn = budget, evaluate_fn
        self.points: list[dict] = []

    def point(self, model, generations: int | None = None, wall_seconds: float | None = None, **extra) -> None:
        """Evaluate `model` now; it has cost `generations` and `wall_seconds` (default: the budget's so far)."""
        if self.evaluate_fn is None:
            return
        spent = self.budget.generations if generations is None else generations
        if self.points and self.points[-1]["generations"] == spent:
            return  # already measured at this budget
        wall = self.budget.wall_seconds if wall_seconds is None else wall_seconds
        with self.budget.excluded():
            accuracy = self.evaluate_fn(model)
        self.points.append({"generations": spent, "wall_seconds": round(wall, 2), "accuracy": accuracy, **extra})
