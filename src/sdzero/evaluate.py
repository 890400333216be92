"""Evaluation: avg@k, the unbiased pass@k, answer lengths, and generate-then-revise.

avg@k samples k answers per problem at T > 0 and averages (#correct / k) over problems. pass@j is
estimated from the same n = k samples with the unbiased estimator 1 - C(n - c, j) / C(n, j). An answer
no reward function could judge (reward None) counts as not correct, and the share of them is reported.

Generate-then-revise (`evaluate_revision`) samples a first answer, then lets the same model revise
it in the same assistant turn after the control phrase, laid out exactly as in Phase 1
(`sdzero.prompts.reviser_context_ids`), and reports how often a wrong answer becomes right.
"""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

from sdzero.errors import Refusal
from sdzero.generation import Generator
from sdzero.prompts import ControlPhrases, bridge_ids, end_of_turn_ids, generator_prompt_ids, reviser_context_ids
from sdzero.rewards import Verifier
from sdzero.tasks import no_answer_summary


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k answers drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise Refusal(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def evaluate(generator: Generator, problems: list[dict], verifier: Verifier, *, k: int = 8,
             system_prompt: str | None = None, samples_path: str | Path | None = None,
             desc: str = "evaluate", progress: bool = True, seed: int | None = None) -> dict:
    """avg@k, pass@1..k (powers of two and k) and mean answer length in tokens.

    With `seed`, the answers are drawn from a random state of their own seeded with it, and the global one is
    left as it was: an evaluation in the middle of training changes nothing the training draws."""
    if k < 1:
        raise Refusal(f"k must be >= 1, got {k}")
    if not problems:
        raise Refusal("evaluation needs at least one problem; the evaluation set is empty")
    tokenizer = generator.tokenizer
    prompts = [generator_prompt_ids(tokenizer, p["problem"], system_prompt) for p in problems]
    samples = generator.sample(prompts, k, desc=desc, progress=progress, **seed_argument(seed))
    correct_counts, lengths, rows = [], [], []
    for problem, answers, rewards in zip(problems, samples,
                                         Verifier.of(verifier).score_groups(samples, problems, generator.sampling)):
        correct_counts.append(sum(r == 1.0 for r in rewards))
        lengths.extend(len(a.ids) for a in answers)
        rows.extend({"id": problem["id"], "response": a.text, "reward": r, "tokens": len(a.ids),
                     "finished": a.finished}
                    for a, r in zip(answers, rewards))
    _write_rows(samples_path, rows)
    report = {
        "metric": f"avg@{k}", "k": k, "n_problems": len(problems),
        "accuracy": sum(c / k for c in correct_counts) / len(problems),
        "mean_length": sum(lengths) / len(lengths),
        # answers cut by the token cap (scored by sampling.unfinished_reward)
        "unfinished": sum(not row["finished"] for row in rows) / len(rows),
        "no_reward": sum(row["reward"] is None for row in rows) / len(rows),
        # answers with nothing to extract (no "Answer:", no \boxed{}, ...); None when the task cannot tell
        "no_answer": no_answer_summary(Verifier.of(verifier).functions, samples, problems),
    }
    for j in sorted({2 ** i for i in range(k.bit_length()) if 2 ** i <= k} | {k}):
        report[f"pass@{j}"] = sum(pass_at_k(k, c, j) for c in correct_counts) / len(problems)
    return report


def seed_argument(seed: int | None) -> dict:
    """`seed=` for `generator.sample` when there is one: a generator of the caller's own need not take it."""
    return {} if seed is None else {"seed": seed}


def _write_rows(path: str | Path | None, rows: list[dict]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


FEEDBACK = ("reward", "wrong")


def evaluate_revision(generator: Generator, problems: list[dict], verifier: Verifier, phrases: ControlPhrases, *,
                      k: int = 1, feedback: str = "reward", system_prompt: str | None = None,
                      samples_path: str | Path | None = None, desc: str = "revise",
                      progress: bool = True, seed: int | None = None) -> dict:
    """Generate-then-revise: k first answers per problem, one revision of each.

    The reviser reads prompt(x) + y + sep + P + sep in the same assistant turn, as in Phase 1. With
    feedback "reward", P is P_r for the verifier's reward r of y (the right-answer phrase after a
    right answer, the wrong-answer phrase after a wrong one); with "wrong", every answer is followed
    by the wrong-answer phrase, so the verifier is not consulted before revising. Reports the first
    and revised accuracy, the correction rate (share of wrong first answers whose revision is right),
    the spoil rate (share of right first answers whose revision is wrong) and both mean lengths. `seed`: as
    for `evaluate` (the revisions draw from seed + 1).
    """
    if feedback not in FEEDBACK:
        raise Refusal(f"unknown revision feedback {feedback!r}; choose one of {', '.join(FEEDBACK)}")
    if k < 1:
        raise Refusal(f"k must be >= 1, got {k}")
    if not problems:
        raise Refusal("evaluation needs at least one problem; the evaluation set is empty")
    tokenizer = generator.tokenizer
    eot = end_of_turn_ids(tokenizer)
    prompts = [generator_prompt_ids(tokenizer, p["problem"], system_prompt) for p in problems]
    firsts = generator.sample(prompts, k, desc=f"{desc}: first answers", progress=progress, **seed_argument(seed))
    verifier = Verifier.of(verifier)
    # An answer with no reward is judged as not correct here: it reads the wrong-answer phrase.
    first_rewards = verifier.score_groups(firsts, problems, generator.sampling)
    pairs = [(i, answer, r or 0.0) for i, (answers, rewards) in enumerate(zip(firsts, first_rewards))
             for answer, r in zip(answers, rewards)]
    bridges = {r: bridge_ids(tokenizer, phrases, r) for r in (0.0, 1.0)}
    contexts = [reviser_context_ids(prompts[i], answer.ids, bridges[r if feedback == "reward" else 0.0], eot)
                for i, answer, r in pairs]
    revision_seed = seed_argument(None if seed is None else seed + 1)
    revisions = [samples[0] for samples in generator.sample(contexts, 1, desc=f"{desc}: revisions",
                                                            progress=progress, **revision_seed)]
    revision_rewards = verifier.score(revisions, [problems[i] for i, _, _ in pairs], generator.sampling)
    rows = []
    for (i, answer, r), revision, revision_reward in zip(pairs, revisions, revision_rewards):
        rows.append({"id": problems[i]["id"], "response": answer.text, "reward": r, "tokens": len(answer.ids),
                     "phrase": phrases.for_reward(r if feedback == "reward" else 0.0),
                     "revision": revision.text, "revision_reward": revision_reward or 0.0,
                     "revision_tokens": len(revision.ids)})
    _write_rows(samples_path, rows)
    wrong = [row for row in rows if row["reward"] < 1.0]
    right = [row for row in rows if row["reward"] >= 1.0]
    return {
        "k": k, "feedback": feedback, "n_problems": len(problems), "n_answers": len(rows),
        "initial_accuracy": len(right) / len(rows),
        "revised_accuracy": sum(row["revision_reward"] for row in rows) / len(rows),
        "correction_rate": sum(row["revision_reward"] for row in wrong) / len(wrong) if wrong else None,
        "spoil_rate": sum(1.0 - row["revision_reward"] for row in right) / len(right) if right else None,
        "n_wrong": len(wrong),
        "initial_length": sum(row["tokens"] for row in rows) / len(rows),
        "revised_length": sum(row["revision_tokens"] for row in rows) / len(rows),
    }
