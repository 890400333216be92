"""The binary reward r of a run: one or more reward functions, scored a batch at a time, weighted and
thresholded into a pass/fail verdict.

A reward function is either of two kinds, told apart by its signature:

* per sample, sdzero's own: `fn(completion: str, problem: dict) -> float` (the built-in tasks' reward
  functions, sdzero.tasks);
* per batch, as TRL's GRPOTrainer calls it: `fn(prompts=..., completions=..., completion_ids=..., **columns)
  -> list[float | None]`, recognised by a `completions` parameter (or by taking only keywords). It is called
  once per batch of rollouts, with every other column of the rows as a keyword holding one value per
  rollout. `completions` are strings for rows whose prompt is a string, and one-message lists
  `[{"role": "assistant", "content": text}]` for rows whose prompt is a list of messages.

Several functions combine as TRL combines them: the weighted sum of their values, a None (the function
does not apply to this sample) counting for nothing. SD-Zero needs a verdict, not a score: it picks the
control phrase P_r by r, and Phase 1 keeps only revisions with r = 1. So r = 1 iff the weighted sum reaches
`threshold` (default: the sum of the weights of the functions that gave a value, i.e. every one of them
returned its full reward 1). A sample for which every function returned None has no reward: it is left
out of training and counted. A response cut by the token cap scores 0 without calling any function when
`sampling.unfinished_reward` is "zero", as before.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from sdzero.errors import Refusal
from sdzero.generation import Sample, SamplingConfig
from sdzero.tasks import reward_function


def is_batch_function(function: Callable) -> bool:
    """True for TRL's signature (prompts=, completions=, completion_ids=, **columns), False for ours
    (completion, problem); an error when the signature fits neither."""
    params = inspect.signature(function).parameters.values()
    if any(p.name == "completions" for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params):
        return False
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return True
    raise Refusal(f"cannot tell how to call the reward function {getattr(function, '__name__', function)!r}: "
                     "give it the signature (completion, problem) or TRL's (prompts, completions, completion_ids, "
                     "**kwargs)")


def task_names(task: str | list[str]) -> list[str]:
    """The reward functions a run's `task` names (one name, or a list of them)."""
    names = [task] if isinstance(task, str) else list(task)
    if not names:
        raise Refusal("task names no reward function")
    return names


@dataclass
class Verifier:
    """A run's reward functions with their weights; `score` turns a batch of responses into verdicts."""

    functions: list[Callable]
    weights: list[float]
    threshold: float | None = None
    """r = 1 iff the weighted sum reaches this; None = the sum of the weights of the functions that gave a value."""

    def __post_init__(self):
        if len(self.weights) != len(self.functions):
            raise Refusal(f"{len(self.weights)} reward weights for {len(self.functions)} reward functions")
        self.batched = [is_batch_function(f) for f in self.functions]

    @classmethod
    def of(cls, verifier) -> "Verifier":
        """`verifier` itself, or one plain reward function with weight 1."""
        return verifier if isinstance(verifier, Verifier) else cls([verifier], [1.0])

    def score(self, samples: list[Sample], problems: list[dict], sampling: SamplingConfig) -> list[float | None]:
        """r in {0.0, 1.0} for each (response, problem) pair, or None where no function gave a value.
        Every stage scores through here, so every stage judges by the same rule."""
        verdicts: list[float | None] = [0.0] * len(samples)
        judged = [i for i, s in enumerate(samples) if s.finished or sampling.unfinished_reward == "score"]
        if not judged:
            return verdicts
        values = [self._values(f, batched, [samples[i] for i in judged], [problems[i] for i in judged])
                  for f, batched in zip(self.functions, self.batched)]
        for n, i in enumerate(judged):
            given = [(w, v[n]) for w, v in zip(self.weights, values) if v[n] is not None]
            if not given:
                verdicts[i] = None
                continue
            total = sum(w * float(value) for w, value in given)
            threshold = self.threshold if self.threshold is not None else sum(w for w, _ in given)
            verdicts[i] = 1.0 if total >= threshold else 0.0
        return verdicts

    def score_groups(self, groups: list[list[Sample]], problems: list[dict],
                     sampling: SamplingConfig) -> list[list[float | None]]:
        """`score` of several responses per problem, in one batch: one list of verdicts per problem."""
        flat = self.score([s for group in groups for s in group],
                          [p for p, group in zip(problems, groups) for _ in group], sampling)
        out, start = [], 0
        for group in groups:
            out.append(flat[start:start + len(group)])
            start += len(group)
        return out

    @staticmethod
    def _values(function, batched: bool, samples: list[Sample], problems: list[dict]) -> list:
        name = getattr(function, "__name__", repr(function))
        if not batched:
            values = [_call(function, name, [p], s.text, p) for s, p in zip(samples, problems)]
        else:
            values = list(_call(function, name, problems, **trl_arguments(samples, problems)))
            if len(values) != len(samples):
                raise Refusal(f"the reward function {name!r} returned {len(values)} rewards for "
                                 f"{len(samples)} completions")
        for value in values:
            if value is not None and (isinstance(value, str) or not isinstance(value, (int, float))):
                raise Refusal(f"the reward function {name!r} returned {value!r}; expected a number or None")
        return values


def _call(function, name: str, problems: list[dict], *args, **kwargs):
    """`function(*args, **kwargs)`; an exception it raises becomes a one-line error naming the function and the
    problem (or the problems of a batch) it was scoring."""
    try:
        return function(*args, **kwargs)
    except Exception as err:
        ids = [str(p.get("id", "?")) for p in problems]
        which = (f"problem {ids[0]}" if len(ids) == 1 else
                 f"a batch of problems {', '.join(ids[:3])}" + (f" (and {len(ids) - 3} more)" if len(ids) > 3 else ""))
        raise Refusal(f"the reward function {name!r} failed on {which}: {type(err).__name__}: {err}") from err


def trl_arguments(samples: list[Sample], problems: list[dict]) -> dict:
    """The keywords TRL's GRPOTrainer gives a reward function, for this batch: prompts, completions,
    completion_ids, and every other column of the rows (one value per completion)."""
    prompts = [p.get("prompt", p["problem"]) for p in problems]
    completions = [[{"role": "assistant", "content": s.text}] if isinstance(prompt, list) else s.text
                   for s, prompt in zip(samples, prompts)]
    keys = dict.fromkeys(k for p in problems for k in p if k not in ("prompt", "completion", "completion_ids"))
    columns = {key: [p.get(key) for p in problems] for key in keys}
    return {"prompts": prompts, "completions": completions, "completion_ids": [list(s.ids) for s in samples],
            **columns}


def make_verifier(task: str | list[str], weights: list[float] | None = None,
                  threshold: float | None = None) -> Verifier:
    """The Verifier of a run's `task`, `reward_weights` (default: 1 each) and `reward_threshold`."""
    names = task_names(task)
    return Verifier([reward_function(n) for n in names], [1.0] * len(names) if weights is None else list(weights),
                    threshold)
