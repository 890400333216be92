"""Phase 2's schedule as plain data: when to evaluate, which evaluation is the best (keep-best), and when to
copy the student into the teacher (every N steps, on a plateau, or gated on a consolidated gain whose
lengths held). No model inside: the trainer reports steps and evaluations, `Progress` answers with decisions,
and the trainer acts on them. Saved in Phase 2's checkpoint as plain JSON (`state` / `from_state`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


def length_tail(lengths: list[int]) -> float:
    """The 90th percentile of response lengths: the part of the distribution that runs away first."""
    ordered = sorted(lengths)
    return float(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]) if ordered else 0.0


@dataclass
class RefreshEvidence:
    """What the gated refresh compares: the tracked accuracy at the last refresh (or at step 0), the length
    tail of the current teacher's own answers (the rollouts of the first step after the last refresh), and
    the lengths of the rollouts since the last evaluation."""

    accuracy: float | None = None
    tail: float | None = None
    lengths: list[int] = field(default_factory=list)


@dataclass
class Budget:
    """Phase 2's sample budget, cumulative."""

    generations: int = 0
    sampled_tokens: int = 0
    trained_tokens: int = 0


@dataclass(frozen=True)
class Decision:
    """What an evaluation asks of the trainer."""

    keep_weights: bool = False
    """A new best with keep-best on: set the student's weights aside as the stage's result."""
    refresh_teacher: bool = False
    """Copy the student into the teacher now (already counted in `Progress.syncs`)."""


@dataclass
class Progress:
    """Where Phase 2 stands: the last finished step, the teacher's version and the steps that refreshed it,
    the evaluation history, the best evaluation, the gated refresh's evidence and the sample budget."""

    step: int = 0
    teacher_version: int = 0
    syncs: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    best: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    refresh: RefreshEvidence = field(default_factory=RefreshEvidence)
    budget: Budget = field(default_factory=Budget)

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        """The progress saved in a checkpoint's state (other keys ignored; a key an older checkpoint lacks
        keeps its starting value)."""
        known = {f.name: state[f.name] for f in fields(cls) if f.name in state}
        if "refresh" in known:
            known["refresh"] = RefreshEvidence(**known["refresh"])
        if "budget" in known:
            known["budget"] = Budget(**known["budget"])
        return cls(**known)

    def record_step(self, step: int, lengths: list[int], generations: int, sampled_tokens: int,
                    trained_tokens: int) -> None:
        """A finished optimiser step: its rollouts' lengths (this process's) and its share of the budget."""
        self.step = step
        self.budget.generations += generations
        self.budget.sampled_tokens += sampled_tokens
        self.budget.trained_tokens += trained_tokens
        self.refresh.lengths += lengths
        if self.refresh.tail is None:
            self.refresh.tail = length_tail(lengths)

    def refresh_on_clock(self, step: int, cfg) -> bool:
        """Self-evolution every `cfg.sync_every` steps: True (and counted) when the teacher is due."""
        if cfg.sync_every and step % cfg.sync_every == 0:
            self.teacher_refreshed(step)
            return True
        return False

    def eval_due(self, step: int, cfg) -> bool:
        """The student is evaluated every `cfg.eval_every` steps and after the last one."""
        return bool(cfg.eval_every) and (step % cfg.eval_every == 0 or step == cfg.max_steps)

    def record_eval(self, step: int, accuracy: float, cfg) -> Decision:
        """An evaluation of the student after `step`: keep-best, then the plateau rule, then the gated refresh
        (a refresh by the plateau rule leaves no teacher answers to judge the gate on, so at most one fires)."""
        self.history.append({"step": step, "accuracy": accuracy, "teacher_version": self.teacher_version})
        new_best = self.best is None or accuracy > self.best
        if new_best:
            self.best, self.best_step, self.evals_since_best = accuracy, step, 0
        else:
            self.evals_since_best += 1
        refresh = cfg.sync_patience is not None and self.evals_since_best >= cfg.sync_patience
        if refresh:
            self.teacher_refreshed(step)
            self.evals_since_best = 0
        if cfg.refresh_margin is not None:
            if self.refresh.accuracy is None:
                self.refresh.accuracy = accuracy  # the teacher's own accuracy, at step 0
            elif self.refresh_gate_open(accuracy, cfg):
                self.teacher_refreshed(step)
                self.refresh.accuracy = accuracy
                refresh = True
            self.refresh.lengths = []
        return Decision(keep_weights=new_best and cfg.keep_best, refresh_teacher=refresh)

    def refresh_gate_open(self, accuracy: float, cfg) -> bool:
        """Gated teacher refresh: the student has consolidated a real gain since the last refresh, and its
        answers are not running long (a drifting student copied into the teacher cannot be undone)."""
        evidence = self.refresh
        if evidence.tail is None or not evidence.lengths:  # no answers of this teacher's to compare with yet
            return False
        gained = accuracy >= evidence.accuracy + cfg.refresh_margin
        tail_held = length_tail(evidence.lengths) <= (1.0 + cfg.refresh_tail_growth) * evidence.tail
        return gained and tail_held

    def teacher_refreshed(self, step: int) -> None:
        self.teacher_version += 1
        self.syncs.append(step)
        self.refresh.tail = None  # measured again on the new teacher's answers

    def ends_on_another_step(self) -> bool:
        """Keep-best: the best evaluation is not of the last step's weights."""
        return self.best_step is not None and self.best_step != self.step
