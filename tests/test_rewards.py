"""Reward functions of both kinds (ours and TRL's signature), TRL's own accuracy rewards, several weighted
functions turned into one verdict, None rewards left out of Phase 1 and Phase 2, and datasets in TRL's
formats: real TRL functions, the real lab model, a real tokenizer with a chat template, real files."""

import json

import numpy as np
import pytest
import torch

from sdzero import lab
from sdzero.collect import CollectConfig, collect
from sdzero.config import load_config
from sdzero.data import DataConfig, load_problem_sets, load_problems
from sdzero.distill import DistillConfig, distill
from sdzero.generation import Generator, Sample, SamplingConfig
from sdzero.lab.task import extract_answer
from sdzero.prompts import ControlPhrases, bridge_ids, end_of_turn_ids, generator_prompt_ids, reviser_context_ids
from sdzero.rewards import Verifier, is_batch_function, make_verifier
from sdzero.tasks.lab import lab_reward
from tiny import build_tiny_model

SCORE_ALL = SamplingConfig(unfinished_reward="score")
SYSTEM = {"role": "system", "content": "Put the final answer in \\boxed{}."}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def finished(text, ids=(1, 2)):
    return Sample(ids=list(ids), text=text, finished=True)


def lab_batch_reward(completions, answer, id, **kwargs):
    """TRL-style lab verdict; no reward at all for problems whose id ends in 0 or 5."""
    return [None if str(i)[-1] in "05" else float(extract_answer(c) == str(a))
            for c, a, i in zip(completions, answer, id)]


def test_the_signature_tells_the_two_kinds_apart():
    import trl.rewards

    assert not is_batch_function(lab_reward)
    assert is_batch_function(trl.rewards.accuracy_reward) and is_batch_function(lab_batch_reward)
    assert is_batch_function(lambda completion_ids, **kwargs: [])  # only keywords beyond one: TRL's call
    assert not is_batch_function(lambda completion, row, **kwargs: 0.0)
    with pytest.raises(ValueError, match="cannot tell how to call"):
        is_batch_function(lambda completion: 0.0)


def test_a_trl_function_is_called_once_per_batch_with_every_column(tmp_path):
    rows = [{"prompt": [SYSTEM, {"role": "user", "content": f"What is {i} + 1?"}], "solution": str(i + 1),
             "level": i} for i in range(3)]
    problems, _ = load_problems(write_jsonl(tmp_path / "c.jsonl", rows), DataConfig(), "trl:accuracy_reward")
    calls = []

    def record(prompts, completions, completion_ids, **columns):
        calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns))
        return [1.0] * len(completions)

    samples = [finished(f"answer {i}", ids=[i, 9]) for i in range(3)]
    assert Verifier([record], [1.0]).score(samples, problems, SCORE_ALL) == [1.0, 1.0, 1.0]
    [call] = calls
    assert call["prompts"] == [r["prompt"] for r in rows]  # the conversation as the data holds it
    assert call["completions"] == [[{"role": "assistant", "content": f"answer {i}"}] for i in range(3)]
    assert call["completion_ids"] == [[0, 9], [1, 9], [2, 9]]
    assert call["solution"] == ["1", "2", "3"] and call["level"] == [0, 1, 2]  # untouched columns, one per row

    # standard format: string prompts, string completions
    standard = [{"prompt": f"Say {i}.", "solution": str(i)} for i in range(2)]
    problems, _ = load_problems(write_jsonl(tmp_path / "s.jsonl", standard), DataConfig(), "trl:accuracy_reward")
    Verifier([record], [1.0]).score([finished("a"), finished("b")], problems, SCORE_ALL)
    assert calls[-1]["prompts"] == ["Say 0.", "Say 1."] and calls[-1]["completions"] == ["a", "b"]


def test_trl_accuracy_rewards_are_trls_own():
    import trl.rewards

    problems = [{"id": str(i), "problem": "q", "solution": s} for i, s in enumerate(["5", "\\frac{1}{2}", "5", "?!"])]
    texts = ["So \\boxed{5}.", "It is \\boxed{0.5}.", "So \\boxed{4}.", "So \\boxed{5}."]
    verdicts = make_verifier("trl:accuracy_reward").score([finished(t) for t in texts], problems, SCORE_ALL)
    direct = trl.rewards.accuracy_reward([[{"role": "assistant", "content": t}] for t in texts],
                                         [p["solution"] for p in problems])
    assert verdicts == direct == [1.0, 1.0, 0.0, None]  # None: TRL cannot parse the gold "?!"
    thinking = ["<think>maybe \\boxed{4}</think> so \\boxed{5}", "<think>\\boxed{5}</think> no answer"]
    verdicts = make_verifier("trl:reasoning_accuracy_reward").score([finished(t) for t in thinking], problems[:1] * 2,
                                                                   SCORE_ALL)
    assert verdicts == [1.0, 0.0]


def scripted(values):
    def reward(completions, **kwargs):
        return values
    return reward


def test_weighted_verdicts_agree_with_a_plain_nansum():
    rng = np.random.default_rng(0)
    n, functions = 200, 3
    values = [[None if rng.random() < 0.2 else float(rng.integers(0, 2)) for _ in range(n)] for _ in range(functions)]
    weights = [1.0, 0.5, 2.0]
    samples, problems = [finished("x")] * n, [{"id": str(i), "problem": "q"} for i in range(n)]
    table = np.array([[np.nan if v is None else v for v in column] for column in values]).T  # [n, functions]
    for threshold in (None, 1.0, 3.5):
        got = Verifier([scripted(v) for v in values], weights, threshold).score(samples, problems, SCORE_ALL)
        total = np.nansum(table * weights, axis=1)
        bar = np.nansum(~np.isnan(table) * weights, axis=1) if threshold is None else np.full(n, threshold)
        expected = [None if np.isnan(row).all() else float(t >= b) for row, t, b in zip(table, total, bar)]
        assert got == expected
    assert None in got and 0.0 in got and 1.0 in got
    with pytest.raises(ValueError, match="2 reward weights for 3 reward functions"):
        Verifier([scripted(v) for v in values], [1.0, 1.0])
    with pytest.raises(ValueError, match="returned 2 rewards for 3 completions"):
        Verifier([scripted([1.0, 1.0])], [1.0]).score(samples[:3], problems[:3], SCORE_ALL)


def test_unfinished_answers_score_zero_without_a_call():
    seen = []

    def reward(completions, **kwargs):
        seen.append(completions)
        return [1.0] * len(completions)

    cut, done = Sample([1], "cut", finished=False), finished("done")
    problems = [{"id": "a", "problem": "q"}] * 2
    assert Verifier([reward], [1.0]).score([cut, done], problems, SamplingConfig()) == [0.0, 1.0]
    assert Verifier([reward], [1.0]).score([cut], problems[:1], SamplingConfig()) == [0.0]
    assert seen == [["done"]]


def test_a_sample_without_reward_is_left_out_of_collect_and_distill(tmp_path, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    n1, n2, _ = lab.problem_sets(12, 8, 1, seed=0)
    without = {p["id"] for p in n1 if p["id"][-1] in "05"}
    assert without and len(without) < len(n1)
    torch.manual_seed(0)
    sampling = SamplingConfig(max_new_tokens=100, batch_size=64, unfinished_reward="score")  # judge every answer
    generator = Generator(model, tokenizer, sampling)
    summary = collect(generator, n1, lab_batch_reward, ControlPhrases(), tmp_path / "phase1",
                      CollectConfig(revisions_per_answer=1), progress=False)
    attempts = [json.loads(line) for line in (tmp_path / "phase1" / "attempts.jsonl").read_text().splitlines()]
    assert all((row["rewards"] == [None]) == (row["id"] in without) for row in attempts)
    assert summary["first_answers_without_reward"] == len(without)
    assert summary["generations"] == len(n1) + len(n1) - len(without)  # those answers are not revised
    kept = (tmp_path / "phase1" / "revisions.jsonl").read_text().splitlines()
    assert not {json.loads(line)["id"] for line in kept} & without

    student = type(model)(model.config)
    student.load_state_dict(model.state_dict())
    cfg = DistillConfig(prompts_per_step=8, micro_batch_size=8, max_steps=1, warmup_steps=0, save_every=None)
    # unfinished_reward "score": every rollout is judged (a cut one would score 0 with no call)
    distill(student, tokenizer, n2, lab_batch_reward, ControlPhrases(),
            SamplingConfig(max_new_tokens=60, unfinished_reward="score"), cfg, out_dir=tmp_path / "phase2",
            progress=False)
    [step] = [json.loads(line) for line in (tmp_path / "phase2" / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert step["sdzero/no_reward"] == sum(p["id"][-1] in "05" for p in n2) > 0
    assert step["sdzero/masked_out"] == 0


def test_conversational_prompts_render_with_the_chat_template_and_the_reviser_continues_the_turn(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "tiny"))
    rows = [{"prompt": [SYSTEM, {"role": "user", "content": "What is 2 + 3?"}], "solution": "5"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    [problem], _ = load_problems(path, DataConfig(), "trl:accuracy_reward")
    prompt = generator_prompt_ids(tokenizer, problem["problem"], system_prompt="ignored: the row has its own")
    assert prompt == tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
    assert tokenizer.decode(prompt).startswith("<|user|>Put the final answer")  # the system turn is there
    answer = tokenizer.encode("It is 5", add_special_tokens=False) + [tokenizer.eos_token_id]
    bridge = bridge_ids(tokenizer, ControlPhrases(), 0.0)
    context = reviser_context_ids(prompt, answer, bridge, end_of_turn_ids(tokenizer))
    assert context == prompt + answer[:-1] + bridge  # the same assistant turn, continued
    # an instruction goes at the end of the user's turn; the system turn stays as it is
    [instructed], _ = load_problems(path, DataConfig(instruction="Be brief."), "trl:accuracy_reward")
    assert instructed["problem"] == [SYSTEM, {"role": "user", "content": "What is 2 + 3?\n\nBe brief."}]


def test_trl_datasets_keep_their_columns_and_read_prompt_first(tmp_path):
    rows = [{"question": f"old {i}", "prompt": f"new {i}", "solution": s} for i, s in enumerate(["7", "whole text"])]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    problems, skipped = load_problems(path, DataConfig(), "trl:accuracy_reward")
    assert [p["problem"] for p in problems] == ["new 0", "new 1"] and skipped["count"] == 0
    assert [p["solution"] for p in problems] == ["7", "whole text"] and all("answer" not in p for p in problems)
    # the built-in math verifier keeps its rules: a solution is a worked solution, read for its last box
    problems, skipped = load_problems(path, DataConfig(), "math")
    assert problems == [] and skipped["count"] == 2
    assert [p["answer"] for p in load_problems(path, DataConfig(answer_field="solution"), "math")[0]] == \
        ["7", "whole text"]
    # a held-out conversation with the same text as a training one is left out of training
    conv = [{"prompt": [{"role": "user", "content": f"q{i}"}], "solution": str(i)} for i in range(6)]
    data = DataConfig(path=write_jsonl(tmp_path / "t.jsonl", conv),
                      eval_path=write_jsonl(tmp_path / "e.jsonl", conv[:2]))
    sets = load_problem_sets(data, "trl:accuracy_reward", 2, 2, 2, seed=0)
    assert sets.skipped["train"]["reasons"] == {"same text as an evaluation problem": 2}


def test_the_config_names_several_functions_with_weights(tmp_path):
    cfg = load_config(overrides=["task=[trl:accuracy_reward, lab]", "reward_weights=[1, 0.5]",
                                 "reward_threshold=1.0", "data.path=problems.jsonl"])
    verifier = cfg.verifier()
    assert verifier.weights == [1.0, 0.5] and verifier.threshold == 1.0 and verifier.batched == [True, False]
    with pytest.raises(ValueError, match="2 reward weights for 1 reward functions"):
        load_config(overrides=["task=lab", "reward_weights=[1, 2]"])
