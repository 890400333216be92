"""Evaluation: avg@k, the unbiased pass@k, and answer lengths on held-out problems.

avg@k samples k answers per problem at T > 0 and averages (#correct / k) over problems. pass@j is
estimated from the same n = k samples with the unbiased estimator 1 - C(n - c, j) / C(n, j).
"""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

from sdzero.generation import Generator
from sdzero.prompts import generator_prompt_ids
from sdzero.verifiers import Verifier


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k answers drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def evaluate(generator: Generator, problems: list[dict], verifier: Verifier, *, k: int = 8,
             system_prompt: str | None = None, samples_path: str | Path | None = None,
             desc: str = "evaluate", progress: bool = True) -> dict:
    """avg@k, pass@1..k (powers of two and k) and mean answer length in tokens."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not problems:
        raise ValueError("evaluation needs at least one problem; the evaluation set is empty")
    tokenizer = generator.tokenizer
    prompts = [generator_prompt_ids(tokenizer, p["problem"], system_prompt) for p in problems]
    samples = generator.sample(prompts, k, desc=desc, progress=progress)
    correct_counts, lengths, rows = [], [], []
    for problem, answers in zip(problems, samples):
        rewards = [verifier(a.text, problem) for a in answers]
        correct_counts.append(int(sum(rewards)))
        lengths.extend(len(a.ids) for a in answers)
        rows.extend({"id": problem["id"], "response": a.text, "reward": r, "tokens": len(a.ids)}
                    for a, r in zip(answers, rewards))
    if samples_path:
        Path(samples_path).parent.mkdir(parents=True, exist_ok=True)
        with open(samples_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    report = {
        "metric": f"avg@{k}", "k": k, "n_problems": len(problems),
        "accuracy": sum(c / k for c in correct_counts) / len(problems),
        "mean_length": sum(lengths) / len(lengths),
    }
    for j in sorted({2 ** i for i in range(k.bit_length()) if 2 ** i <= k} | {k}):
        report[f"pass@{j}"] = sum(pass_at_k(k, c, j) for c in correct_counts) / len(problems)
    return report
