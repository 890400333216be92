"""`sdzero check`: score every row's own reference solution with the run's verifier.

A data set whose references do not pass its own verifier trains on noise: broken tests, answers in a form the
checker does not read, a field mapped wrongly. `check_data` loads the rows the way a run does, turns each row's
reference (the field the user names) into a completion, scores it, and reports the rows that failed (reward 0)
or errored (the verifier raised). With the field "none" it scores a non-answer instead, to see that the checks
reject it.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

from sdzero.errors import Refusal
from sdzero.generation import Sample
from sdzero.tasks import reasoning_gym

NO_SOLUTION = "none"
"""The --solution-field value that scores a non-answer: an empty completion (code), the problem text (others)."""
GYM_CHECK_SIZE = 100
"""Questions a reasoning-gym source makes for a check without --limit."""


def load_check_problems(cfg, limit: int | None = None) -> list[dict]:
    """Every validated problem of the run's data (a file, a hub dataset or a source), the first `limit` of them."""
    from sdzero import data as data_module

    data, task = cfg.data, cfg.task
    data_module.check_source(data, task)
    if data_module.is_gym_source(data):
        count = limit or data.size or GYM_CHECK_SIZE
        # The held-out stream, as a run evaluates it; the one training problem it asks for is not checked.
        problems = data_module.generated_problem_sets(replace(data, size=None), task, 1, 0, count, cfg.seed).held_out
    elif data.source is not None:
        problems, _ = data_module.load_source_problems(data, task)
    elif data.path is not None:
        problems, _ = data_module.load_problems(data.path, data, task, name=data.name, split=data.split)
    else:
        raise Refusal("nothing to check: give --data (a file, a hub id or a source such as humaneval)")
    return problems[:limit] if limit is not None else problems


def _problem_text(problem: dict) -> str:
    text = problem["problem"]
    return text if isinstance(text, str) else text[-1]["content"]


def reference_completion(problem: dict, field: str, rules: str, answer_rule: str | None = None) -> str:
    """The completion that states the row's reference in FIELD as the task's reward function reads it: code as it is
    (a body or a whole program), math as \\boxed{ref}, reasoning-gym in its answer rule's format, the lab
    task as "Answer: ref", anything else as it is. FIELD "none": a non-answer."""
    if field == NO_SOLUTION:
        return "" if rules == "code" else _problem_text(problem)
    value = problem.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Refusal(f"field {field!r} is missing or empty")
    reference = value if isinstance(value, str) else json.dumps(value)
    if rules == "code":
        return reference
    if rules == "math":
        return f"\\boxed{{{reference}}}"
    if rules == "reasoning-gym" or ("generator" in problem and "answer_rule" in problem):
        return reasoning_gym.reference_completion(reference, problem.get("answer_rule") or answer_rule)
    if rules == "lab":
        return f"Answer: {reference}"
    return reference


def _score(verifier, sampling, problem: dict, completion: str) -> float | None:
    return verifier.score([Sample(ids=[], text=completion, finished=True)], [problem], sampling)[0]


def check_data(cfg, field: str, *, limit: int | None = None, out_dir: str | Path | None = None,
               progress: bool = True, workers: int | None = None) -> dict:
    """Score each problem's reference in `field` with the run's verifier; the summary {rows, passed, failed,
    errors, seconds, ...}. With `out_dir`, writes out_dir/failures.jsonl (one row per failed or erroring
    problem, with the reason) and out_dir/check.json (the summary)."""
    from tqdm.auto import tqdm

    from sdzero.data import data_rules, is_gym_source

    started = time.perf_counter()
    problems = load_check_problems(cfg, limit)
    rules = "reasoning-gym" if is_gym_source(cfg.data) and data_rules(cfg.task) != "code" else data_rules(cfg.task)
    if field != NO_SOLUTION and not any(field in p for p in problems):
        columns = sorted({key for p in problems for key in p})
        raise Refusal(f"--solution-field {field!r} is not a field of the data; its fields: {columns}")
    verifier, sampling = cfg.verifier(), cfg.sampling

    def verdict(problem: dict) -> dict:
        try:
            completion = reference_completion(problem, field, rules, cfg.data.answer_rule)
            reward = _score(verifier, sampling, problem, completion)
        except Exception as err:  # any failure of the verifier is reported as this row's error, not raised
            return {"id": problem["id"], "status": "error", "reason": f"{type(err).__name__}: {err}"}
        if reward == 1.0:
            return {"id": problem["id"], "status": "passed"}
        reason = "the verifier gave no reward" if reward is None else f"reward {reward:g}"
        return {"id": problem["id"], "status": "failed", "reason": reason, "completion": completion}

    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    results = {}
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(problems), desc="checking", unit="row", disable=not progress) as bar:
        futures = {pool.submit(verdict, p): i for i, p in enumerate(problems)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
    ordered = [results[i] for i in range(len(problems))]
    bad = [r for r in ordered if r["status"] != "passed"]
    summary = {
        "data": cfg.data.source or cfg.data.path, "task": cfg.task, "solution_field": field,
        "rows": len(ordered), "passed": len(ordered) - len(bad),
        "failed": sum(r["status"] == "failed" for r in bad), "errors": sum(r["status"] == "error" for r in bad),
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "failures.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
        (out_dir / "check.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["problems"] = bad[:5]
    return summary


def format_summary(summary: dict) -> str:
    """The summary in a few lines: the counts, then the first failing or erroring rows with their reasons."""
    lines = [f"{summary['rows']} rows: {summary['passed']} passed, {summary['failed']} failed, "
             f"{summary['errors']} errors ({summary['seconds']:.1f} s)"]
    lines += [f"  {r['id']}: {r['status']}: {r['reason']}" for r in summary["problems"]]
    return "\n".join(lines)
