"""The lab task's reward, on rows of the built-in task family (sdzero.lab), whose responses end "Answer: N"."""

from __future__ import annotations

from sdzero.lab.task import extract_answer


def lab_reward(completion: str, row: dict) -> float:
    """1.0 iff the last "Answer: N" of the completion equals the row's answer."""
    return 1.0 if extract_answer(completion) == str(row["answer"]) else 0.0


def extract(completion: str, row: dict) -> str | None:
    """The N of the completion's last "Answer: N", or None."""
    return extract_answer(completion)
