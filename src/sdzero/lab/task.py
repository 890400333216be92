"""The lab task: running sums of single digits modulo 10, worked step by step.

A problem names digits a, b, c, ... A worked solution writes one step per digit after the first,
"c: s+d=t", where s is the running sum so far, d the digit named c, and t = (s + d) mod 10, then
the final answer:

    problem:  Running sum mod 10 of a=3 b=5 c=2 d=8
    solution: b: 3+5=8, c: 8+2=0, d: 0+8=8. Answer: 8

Naming the digits lets a small model find the next digit by its name, wherever the step is written
(a first attempt, or a revision after it), instead of by counting positions.

Every step is checked exactly, so the checker can say not only whether the final answer is right
but also where the first wrong step of a solution lies: the ground truth that the token-level
analysis compares the teacher-student signal with.

The typical mistake is a carry slip: on a step whose true sum reaches 10, the writer adds one too
many (8+2=1 instead of 0) and carries on from the wrong value. Slips only happen on carry steps,
so errors sit at identifiable places, as they do in real worked solutions.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from sdzero.errors import Refusal

PROBLEM_PREFIX = "Running sum mod 10 of "
STEP_RE = re.compile(r"[a-z]: (\d)\+(\d)=(\d)")
NAMES = "abcdefghij"
ANSWER_RE = re.compile(r"Answer: (\d)")
# One problem in EVAL_EVERY is held out for evaluation, chosen by a hash of its digits, so the
# split is the same in every run and no training problem can ever equal an evaluation problem.
EVAL_EVERY = 8


@dataclass(frozen=True)
class Problem:
    digits: tuple[int, ...]

    @property
    def id(self) -> str:
        return "lab-" + "".join(map(str, self.digits))

    @property
    def text(self) -> str:
        return PROBLEM_PREFIX + " ".join(f"{name}={d}" for name, d in zip(NAMES, self.digits))

    @property
    def answer(self) -> str:
        return str(sum(self.digits) % 10)

    def to_row(self) -> dict:
        return {"id": self.id, "problem": self.text, "answer": self.answer}

    @classmethod
    def from_id(cls, problem_id: str) -> "Problem":
        if not (problem_id.startswith("lab-") and problem_id[4:].isdigit()):
            raise Refusal(f"not a lab problem id: {problem_id!r}")
        return cls(tuple(int(d) for d in problem_id[4:]))

    @classmethod
    def from_row(cls, row: dict) -> "Problem":
        text = row["problem"]
        if not text.startswith(PROBLEM_PREFIX):
            raise Refusal(f"not a lab problem: {text!r}")
        return cls(tuple(int(item.split("=")[1]) for item in text[len(PROBLEM_PREFIX):].split()))


def is_eval_problem(digits: tuple[int, ...]) -> bool:
    digest = hashlib.sha256("".join(map(str, digits)).encode()).digest()
    return digest[0] % EVAL_EVERY == 0


def sample_problems(n: int, *, split: str, seed: int, min_digits: int = 5, max_digits: int = 7,
                    exclude: set[str] | None = None) -> list[Problem]:
    """`n` distinct problems from the "train" or "eval" split (disjoint by construction). "validation" draws
    from the training side of the hash on a random stream of its own, so a validation problem is never an
    evaluation problem; `exclude` keeps the training draws off it."""
    if split not in ("train", "validation", "eval"):
        raise Refusal(f"split must be 'train', 'validation' or 'eval', got {split!r}")
    rng = random.Random(f"{split}-{seed}")
    seen = set(exclude or ())
    problems = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise Refusal(f"could not draw {n} distinct {split} problems")
        length = rng.randint(min_digits, max_digits)
        digits = tuple(rng.randrange(10) for _ in range(length))
        problem = Problem(digits)
        if is_eval_problem(digits) != (split == "eval") or problem.id in seen:
            continue
        seen.add(problem.id)
        problems.append(problem)
    return problems


def gold_steps(problem: Problem) -> list[tuple[int, int, int]]:
    steps, total = [], problem.digits[0]
    for d in problem.digits[1:]:
        steps.append((total, d, (total + d) % 10))
        total = (total + d) % 10
    return steps


ERROR_KINDS = ("operand", "running sum", "carry slip", "sum", "extra step", "ending")
"""What the first attempt's first error is: an operand that is not the problem's digit, a running sum
not taken from the previous step, a carry slip (the corpus's mistake: on a step whose true sum
reaches 10, one too many), any other wrong sum of the written operands, a step past the last digit,
or (every written step right) missing steps or a wrong final answer."""


def first_error_kind(completion: str, problem: Problem) -> str | None:
    """The kind (one of ERROR_KINDS) of the first error in the first attempt; None if it is right."""
    attempt = completion.split("\n\n", 1)[0]
    gold = gold_steps(problem)
    steps = [tuple(int(x) for x in step) for step in STEP_RE.findall(attempt)]
    for i, (running, operand, total) in enumerate(steps):
        if i >= len(gold):
            return "extra step"
        if operand != gold[i][1]:
            return "operand"
        if running != gold[i][0]:
            return "running sum"
        if total != (running + operand) % 10:
            slip = running + operand >= 10 and total == (running + operand + 1) % 10
            return "carry slip" if slip else "sum"
    answer = ANSWER_RE.search(attempt)
    if len(steps) == len(gold) and answer is not None and answer.group(1) == problem.answer:
        return None
    return "ending"


def error_counts(samples_path: str | Path) -> dict:
    """Counts of first_error_kind over the wrong answers (reward 0) of an evaluation samples file
    ("first attempt right" where a later attempt went wrong)."""
    answers = wrong = 0
    kinds = dict.fromkeys((*ERROR_KINDS, "first attempt right"), 0)
    with open(samples_path) as f:
        for line_number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                problem, response, right = Problem.from_id(row["id"]), row["response"], row["reward"] > 0
            except (ValueError, KeyError, TypeError) as err:
                raise Refusal(f"{samples_path}, line {line_number}: not a lab evaluation sample ({err})") from None
            answers += 1
            if not right:
                wrong += 1
                kinds[first_error_kind(response, problem) or "first attempt right"] += 1
    return {"answers": answers, "wrong": wrong, "kinds": kinds}


def write_solution(problem: Problem, rng: random.Random | None = None, slip_rate: float = 0.0,
                   misread_rate: float = 0.0, operands: list[int] | None = None) -> str:
    """A worked solution; with `slip_rate` > 0 each carry step slips (adds one) with that chance, with
    `misread_rate` > 0 each step reads its operand wrong (another digit, summed as read) with that chance.
    `operands` replaces the problem's digits after the first: a writer copying another attempt's steps."""
    parts, total = [], problem.digits[0]
    for name, d in zip(NAMES[1:], operands if operands is not None else problem.digits[1:]):
        if rng is not None and misread_rate > 0 and rng.random() < misread_rate:
            d = rng.choice([other for other in range(10) if other != d])
        result = (total + d) % 10
        if rng is not None and total + d >= 10 and rng.random() < slip_rate:
            result = (result + 1) % 10
        parts.append(f"{name}: {total}+{d}={result}")
        total = result
    return ", ".join(parts) + f". Answer: {total}"


def written_operands(attempt: str) -> list[int]:
    """The operands an attempt's steps wrote, in order."""
    return [int(operand) for _, operand, _ in STEP_RE.findall(attempt)]


def extract_answer(text: str) -> str | None:
    """The last "Answer: N" in the text, so a response that starts over is judged by its last try."""
    found = ANSWER_RE.findall(text)
    return found[-1] if found else None


def reward(completion: str, problem: Problem) -> float:
    return 1.0 if extract_answer(completion) == problem.answer else 0.0


def gold_digits(completion: str, problem: Problem) -> list[tuple[int, int]]:
    """(character index, correct digit) for every digit of every step the completion writes: in each
    attempt (attempts are separated by blank lines), the i-th step's running sum, operand and result
    should be those of the problem's i-th gold step, whatever the attempt wrote before."""
    gold, digits, start = gold_steps(problem), [], 0
    for attempt in completion.split("\n\n"):
        for match, step in zip(STEP_RE.finditer(attempt), gold):
            digits += [(start + match.start(group), value) for group, value in zip((1, 2, 3), step)]
        start += len(attempt) + 2
    return digits


def first_wrong_step(completion: str, problem: Problem) -> tuple[int, int] | None:
    """Character span (start, end) of the first wrong step of the first attempt, None if it has none.

    The first attempt is the text before the first blank line (a revision starts after one). A step
    is wrong when it differs from the gold step at the same index. If every written step is right but
    steps are missing, or the answer is wrong, the span covers what follows the last right step.
    """
    attempt_end = completion.find("\n\n")
    attempt = completion if attempt_end < 0 else completion[:attempt_end]
    gold = gold_steps(problem)
    last_end = 0
    for i, match in enumerate(STEP_RE.finditer(attempt)):
        written = tuple(int(g) for g in match.groups())
        if i >= len(gold) or written != gold[i]:
            return match.span()
        last_end = match.end()
        if i == len(gold) - 1:
            break
    answer = ANSWER_RE.search(attempt, last_end)
    steps_done = len(STEP_RE.findall(attempt[:last_end]))
    if steps_done == len(gold) and answer is not None and answer.group(1) == problem.answer:
        return None
    return (last_end, len(attempt)) if len(attempt) > last_end else (max(0, last_end - 1), last_end)
