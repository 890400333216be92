"""The tasks sdzero judges: each owns its reward function, (completion, problem row) -> reward in {0.0, 1.0}, and
the parsing of its rows and responses.

- "lab": sdzero.tasks.lab, the built-in task family ("Answer: N").
- "math": sdzero.tasks.math, the last \\boxed{...} of the completion checked against row["answer"] with math-verify.
- "code": sdzero.tasks.code, the last fenced code block run in the sandbox against row["tests"] (their forms:
  sdzero.tasks.code_rows; HumanEval and MBPP rows: sdzero.tasks.codesuites).
- "reasoning-gym": sdzero.tasks.reasoning_gym, the generator that made the row scores the answer.

A problem row is a dict with at least "id" and "problem". Every stage takes its reward function as a plain callable
with this signature, so your own function, named "package.module:function", drops in unchanged. TRL's own accuracy
rewards are named as in TRL_REWARDS.
"""

from __future__ import annotations

import importlib
from typing import Callable

from sdzero.errors import Refusal
from sdzero.tasks import code, lab, math, reasoning_gym

RewardFunction = Callable[[str, dict], float]
"""A per-sample reward function: (completion, problem row) -> reward."""

REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "lab": lab.lab_reward,
    "math": math.math_row_reward,
    "code": code.code_row_reward,
    "reasoning-gym": reasoning_gym.reasoning_gym_reward,
}
"""The built-in tasks' reward functions, by task name."""
EXTRACTORS: dict[str, Callable[[str, dict], str | None]] = {
    "lab": lab.extract,
    "math": math.extract,
    "reasoning-gym": reasoning_gym.extract,
}
"""Per built-in task: (completion, row) -> the final answer its reward function reads, None when there is nothing to
extract (evaluation counts those answers). Your own reward function may carry one as its `extract` attribute."""
TRL_REWARDS = {"trl:accuracy_reward": "accuracy_reward",
               "trl:reasoning_accuracy_reward": "reasoning_accuracy_reward"}
"""Built-in names for TRL's own reward functions (`trl.rewards`), which read the `solution` column."""


def reward_function(name: str) -> Callable:
    """A reward function by name: a built-in task's (REWARD_FUNCTIONS), one of TRL_REWARDS, or your own as
    "package.module:function"."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if name in TRL_REWARDS:
        return _trl_reward(name)
    module_name, sep, function_name = name.partition(":")
    if not sep:
        raise Refusal(f"unknown verifier {name!r}; choose one of {sorted(REWARD_FUNCTIONS)} "
                         "or name your own function as package.module:function")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise Refusal(f"cannot load the reward function {name!r}: {err}") from None
    if not callable(function):
        raise Refusal(f"the reward function {name!r} is not callable")
    return function


def _trl_reward(name: str) -> Callable:
    import trl.rewards

    trl_function = getattr(trl.rewards, TRL_REWARDS[name])

    def reward(prompts, completions, completion_ids, **columns):
        # TRL's accuracy rewards read completion[0]["content"]: give them messages for string prompts too.
        messages = [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions]
        return trl_function(prompts=prompts, completions=messages, completion_ids=completion_ids, **columns)

    reward.__name__ = TRL_REWARDS[name]
    return reward


def answer_extractor(function: Callable) -> Callable[[str, dict], str | None] | None:
    """The `extract(completion, row)` of a reward function (built-in: EXTRACTORS; yours: its `extract`
    attribute), or None when it has none."""
    for name, reward in REWARD_FUNCTIONS.items():
        if reward is function:
            return EXTRACTORS.get(name)
    return getattr(function, "extract", None)


def no_answer_summary(functions: list[Callable], groups: list[list], problems: list[dict]) -> dict | None:
    """{"count", "share"} of the responses (`groups`: the samples of each problem) from which no reward function
    could extract an answer; None when none of the functions has an extractor."""
    extractors = [e for e in map(answer_extractor, functions) if e is not None]
    if not extractors:
        return None
    texts = [(sample.text, problem) for problem, group in zip(problems, groups) for sample in group]
    count = sum(all(extract(text, problem) is None for extract in extractors) for text, problem in texts)
    return {"count": count, "share": count / len(texts) if texts else 0.0}
