"""Verifiers: (completion, problem row) -> reward in {0.0, 1.0}.

A problem row is a dict with at least "id", "problem" and "answer". Every stage takes its verifier
as a plain callable with this signature, so a user's own reward function drops in unchanged.
"""

from __future__ import annotations

from typing import Callable

from sdzero.lab.task import extract_answer

Verifier = Callable[[str, dict], float]


def lab_reward(completion: str, row: dict) -> float:
    """1.0 iff the last "Answer: N" of the completion equals the row's answer."""
    return 1.0 if extract_answer(completion) == str(row["answer"]) else 0.0


VERIFIERS: dict[str, Verifier] = {"lab": lab_reward}


def get_verifier(name: str) -> Verifier:
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; choose one of {sorted(VERIFIERS)}")
    return VERIFIERS[name]
