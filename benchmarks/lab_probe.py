"""Does a lab model's reviser read the problem? The Phase 2 teacher's next-digit probabilities at a planted
error, against the student's, on held-out lab problems.

    python benchmarks/lab_probe.py --model lab lab-v2 lab-control [--n 200] [--seed 0]

For each problem, a worked solution y gets one planted error at a random step, and the teacher reads
prompt + y + "start over" bridge + the start of y's second copy, up to the planted digit (the context
Phase 2 builds for a wrong y):

* misread: y's operand at the step is another digit (summed as written). Teacher P(y's copied operand)
  and P(the problem's digit), against the student's P(the problem's digit) given the prompt and y's
  prefix. A reviser that reads the problem gives the problem's digit; one that copies y gives y's.
* slip: y's result at a carry step is one too many. Teacher P(the right result) and P(y's result), against
  the student's: the gap between them is the signal Phase 2 turns into a gradient at y's first wrong step.

"short" plants the error in a one-attempt y; "long" in the second attempt of a y that already starts over
once (a two-attempt answer, as SRT writes), so the teacher reads it at about twice the depth.
Prints one `model probe layout: value` line per figure (means over problems).
"""

from __future__ import annotations

import argparse
import random

import torch

from sdzero.lab.task import NAMES, Problem, gold_steps, sample_problems, write_solution
from sdzero.modeling import load_model
from sdzero.prompts import ControlPhrases, SEPARATOR, bridge_ids, generator_prompt_ids


def planted(problem: Problem, step: int, kind: str, rng: random.Random) -> tuple[str, str, int, int]:
    """(y with the error, y's text before the planted digit, the problem's digit, y's digit)."""
    operands = list(problem.digits[1:])
    total = problem.digits[0]
    parts, prefix, right, written = [], "", 0, 0
    for i, (name, d) in enumerate(zip(NAMES[1:], operands)):
        if i == step and kind == "misread":
            wrong = rng.choice([other for other in range(10) if other != d])
            prefix, right, written = ", ".join(parts + [f"{name}: {total}+"]), d, wrong
            d = wrong
        result = (total + d) % 10
        if i == step and kind == "slip":
            prefix, right, written = ", ".join(parts + [f"{name}: {total}+{d}="]), result, (result + 1) % 10
            result = written
        parts.append(f"{name}: {total}+{d}={result}")
        total = result
    return ", ".join(parts) + f". Answer: {total}", prefix, right, written


def next_digit_probs(model, ids: list[int], digit_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    return torch.softmax(logits, -1)[digit_ids]


def probe(model, tokenizer, problems: list[Problem], kind: str, layout: str, seed: int) -> dict:
    rng = random.Random(seed)
    phrases = ControlPhrases()
    digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    bridge = bridge_ids(tokenizer, phrases, 0.0)
    sums = {"teacher_right": 0.0, "teacher_copied": 0.0, "student_right": 0.0, "student_copied": 0.0}
    n = 0
    for problem in problems:
        carries = [i for i, (running, d, _) in enumerate(gold_steps(problem)) if running + d >= 10]
        steps = range(len(problem.digits) - 1) if kind == "misread" else carries
        if not steps:
            continue
        y, prefix, right, written = planted(problem, rng.choice(list(steps)), kind, rng)
        if layout == "long":  # a first attempt that slipped, "start over", then y
            y = write_solution(problem, rng, slip_rate=1.0) + SEPARATOR + phrases.wrong + SEPARATOR + y
            prefix = y[:y.rindex(SEPARATOR) + len(SEPARATOR)] + prefix
        prompt = generator_prompt_ids(tokenizer, problem.text)
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        teacher = next_digit_probs(model, prompt + encode(y) + bridge + encode(prefix), digit_ids)
        student = next_digit_probs(model, prompt + encode(prefix), digit_ids)
        sums["teacher_right"] += float(teacher[right])
        sums["teacher_copied"] += float(teacher[written])
        sums["student_right"] += float(student[right])
        sums["student_copied"] += float(student[written])
        n += 1
    return {key: value / n for key, value in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["lab"], help="lab model names or folders")
    parser.add_argument("--n", type=int, default=200, help="held-out problems")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    problems = sample_problems(args.n, split="eval", seed=args.seed)
    for name in args.model:
        model, tokenizer = load_model(name)
        model.eval()
        for kind in ("misread", "slip"):
            for layout in ("short", "long"):
                figures = probe(model, tokenizer, problems, kind, layout, args.seed)
                print(f"{name} {kind} {layout}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()),
                      flush=True)


if __name__ == "__main__":
    main()
