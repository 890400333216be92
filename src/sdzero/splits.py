"""A run's problem sets: the pool split into disjoint N1 (Phase 1), N2 (Phase 2), validation and held-out sets,
and split.json, the record that keeps them the same for every later command of the run.

sdzero.data reads the pool and calls `split_problems` (`split_with_eval_set` when the held-out problems come from an
evaluation set of their own); a reasoning-gym source and the lab task draw their sets by their own rules into the
same `ProblemSets`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from sdzero.errors import Refusal
from sdzero.training import read_json

EVAL_SHUFFLE_SEED = 0
"""The held-out and validation sets are drawn with this fixed seed, so every run seed is evaluated (and its
Phase 2 checkpoints are chosen) on the same problems."""
SPLIT_RULE = (
    f"held_out = the first n_eval problems of the pool shuffled with seed {EVAL_SHUFFLE_SEED} (the same "
    "for every run seed; the whole eval set is shuffled instead when an eval file is given); "
    "validation = the next n_validation problems of that shuffle (the first ones when an eval file is given); "
    "n_phase1 = the first n_phase1 of the remaining problems shuffled with the run seed, "
    "n_phase2 = the next n_phase2. Too few problems is an error."
)


@dataclass
class ProblemSets:
    """The problems of one run, and what was left out of them."""

    n1: list[dict]
    """Phase 1's problems (collection)."""
    n2: list[dict]
    """Phase 2's problems (self-distillation)."""
    held_out: list[dict]
    """The evaluation problems the final figures are reported on; nothing is chosen on them."""
    validation: list[dict] = field(default_factory=list)
    """Problems from the training side, disjoint from N1, N2 and held-out, the same for every run seed: Phase 2's
    learning curve, keep-best, the plateau rule and the gated refresh are measured on them."""
    skipped: dict = field(default_factory=dict)
    """{"train": summary, "eval": summary}, each {"count", "reasons": {reason: count}, "rows": first 5}."""


def shuffled(problems: list[dict], seed: int) -> list[dict]:
    """A copy of `problems` in the order `seed` shuffles them."""
    order = list(problems)
    random.Random(seed).shuffle(order)
    return order


SET_SIZE_HINT = "pass --limit N to use at most N problems per set, or lower n_phase1 / n_phase2 / eval.n_problems"
"""How to ask for fewer problems, in every error about a set too large for its pool."""


def split_problems(
    problems: list[dict], n_phase1: int, n_phase2: int, n_eval: int, seed: int, n_validation: int = 0
) -> ProblemSets:
    """Disjoint N1, N2, validation and held-out problems by SPLIT_RULE; an error when the pool is too small."""
    wanted = n_phase1 + n_phase2 + n_validation + n_eval
    if min(n_phase1, n_phase2, n_validation, n_eval) < 0 or wanted > len(problems):
        raise Refusal(
            f"the problem pool has {len(problems)} problems; requested n_phase1={n_phase1} + "
            f"n_phase2={n_phase2} + n_validation={n_validation} + n_eval={n_eval} = {wanted}; {SET_SIZE_HINT}"
        )
    fixed_order = shuffled(problems, EVAL_SHUFFLE_SEED)  # the same for every run seed
    held_out, validation = fixed_order[:n_eval], fixed_order[n_eval : n_eval + n_validation]
    fixed_ids = {p["id"] for p in held_out + validation}
    train = shuffled([p for p in problems if p["id"] not in fixed_ids], seed)
    return ProblemSets(train[:n_phase1], train[n_phase1 : n_phase1 + n_phase2], held_out, validation)


def split_with_eval_set(pool: list[dict], evals: list[dict], skipped: dict, n_phase1: int, n_phase2: int,
                        n_eval: int, seed: int, n_validation: int = 0) -> ProblemSets:
    """N1, N2 and validation problems from `pool`, held-out ones from an evaluation set of its own, by SPLIT_RULE.
    Pool problems with an evaluation problem's text are left out, and counted in `skipped` (the pool's summary)."""
    # A training problem with the same text as an evaluation problem would leak it: leave it out.
    eval_texts = {json.dumps(p["problem"]) for p in evals}  # json: a conversation is a list
    leaked = [p["id"] for p in pool if json.dumps(p["problem"]) in eval_texts]
    if leaked:
        skipped["count"] += len(leaked)
        skipped["reasons"]["same text as an evaluation problem"] = len(leaked)
        skipped["rows"] = (skipped["rows"] + [f"id {i}" for i in leaked])[:5]
        pool = [p for p in pool if json.dumps(p["problem"]) not in eval_texts]
    sets = split_problems(pool, n_phase1, n_phase2, 0, seed, n_validation)
    sets.held_out = shuffled(evals, EVAL_SHUFFLE_SEED)[:n_eval]
    return sets


def record_split(record_dir: str | Path, identity: dict, sets: ProblemSets) -> None:
    """Write record_dir/split.json: `identity` (the task, source, eval_source, seed and rule that drew the sets),
    the ids of each set and the skipped rows; when the run has one already, the sets must be the recorded ones
    (check_split)."""
    record = {
        **identity,
        "n_phase1": [p["id"] for p in sets.n1], "n_phase2": [p["id"] for p in sets.n2],
        "validation": [p["id"] for p in sets.validation], "held_out": [p["id"] for p in sets.held_out],
        "skipped": sets.skipped,
    }  # fmt: skip
    path = Path(record_dir) / "split.json"
    if path.exists():
        check_split(path, read_json(path), record)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")


def check_split(path: Path, recorded: dict, drawn: dict) -> None:
    """A run has one split: the sets drawn now must be the recorded ones, or the command is refused,
    naming what differs (a command never redraws a run's split)."""
    for key in ("task", "source", "eval_source", "seed"):
        if recorded.get(key) != drawn[key]:
            raise Refusal(f"{path}: the run's split was drawn with {key} {recorded.get(key)!r}; this command has "
                             f"{drawn[key]!r} (use another --out for another split)")
    if "validation" not in recorded and drawn["validation"]:
        # A split from before validation sets: its held-out set stays readable (a command that asks for no
        # validation problems draws the same sets), but Phase 2 would choose on held-out problems.
        raise Refusal(f"{path}: the run's split has no validation set (it was recorded by an older sdzero); pass "
                         "--restart to start the run again with one, or use another --out")
    recorded = {"validation": [], **recorded}
    keys = ("n_phase1", "n_phase2", "validation", "held_out")
    for key in keys:  # sizes first: another validation size moves N1 and N2 too, and is the cause to name
        if len(recorded[key]) != len(drawn[key]):
            raise Refusal(f"{path}: the run's {key} set has {len(recorded[key])} problems; this command asks for "
                             f"{len(drawn[key])} (keep the run's --limit and set sizes, or use another --out)")
    for key in keys:
        moved = next((i for i in drawn[key] if i not in set(recorded[key])), None)
        if moved is not None:
            raise Refusal(f"{path}: problem {moved!r} is not in the run's recorded {key} set: the data changed "
                             "since the split was recorded (use another --out for the new data)")
