"""The built-in lab: a verifiable multi-step task and a tiny base model trained from scratch."""

from __future__ import annotations

from pathlib import Path

from sdzero.lab.task import Problem, first_wrong_step, sample_problems

BASE_MODEL_DIR = Path(__file__).parent / "base_model"
"""The shipped lab base model, produced by `sdzero lab pretrain --out` this folder."""
LAB_MODELS = {
    "lab": (BASE_MODEL_DIR, "v1"),
    "lab-v2": (Path(__file__).parent / "base_model_v2", "v2"),
    "lab-control": (Path(__file__).parent / "base_model_control", "control"),
}
"""The shipped lab base models by the name a config's `model:` gives them: (folder, pretraining preset).
"lab" is the v1 model every figure in the docs was measured on; see `sdzero.lab.model` for the presets."""
PRETRAIN_CPU_MINUTES = 50
"""How long `sdzero lab pretrain` takes with the default recipe on 2 CPU cores (measured: ~1.2 s per step);
the command's help says it, and a test holds the README to it."""
EVAL_SEED = 0
"""The held-out evaluation problems are the same for every run seed, so seeds compare like for like."""
VALIDATION_SEED = 0
"""The validation problems (training side, drawn on their own stream) are the same for every run seed too."""


def validation_problems(n_validation: int) -> list[dict]:
    """The first `n_validation` validation problems: training-side problems that N1 and N2 never hold."""
    return [p.to_row() for p in sample_problems(n_validation, split="validation", seed=VALIDATION_SEED)]


def problem_sets(n_phase1: int, n_phase2: int, n_eval: int, seed: int,
                 n_validation: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """Disjoint N1 and N2 training problems (drawn by `seed`, none of the first `n_validation` validation
    problems) and the held-out evaluation problems."""
    validation_ids = {row["id"] for row in validation_problems(n_validation)}
    train = sample_problems(n_phase1 + n_phase2, split="train", seed=seed, exclude=validation_ids)
    held_out = sample_problems(n_eval, split="eval", seed=EVAL_SEED)
    rows = [p.to_row() for p in train]
    return rows[:n_phase1], rows[n_phase1:], [p.to_row() for p in held_out]


__all__ = ["BASE_MODEL_DIR", "LAB_MODELS", "Problem", "first_wrong_step", "problem_sets", "sample_problems",
           "validation_problems"]
