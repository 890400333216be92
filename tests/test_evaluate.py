import json
from itertools import combinations

import pytest
import torch

from sdzero import lab
from sdzero.evaluate import evaluate, evaluate_revision, pass_at_k
from sdzero.generation import Generator, Sample, SamplingConfig
from sdzero.lab.task import sample_problems
from sdzero.prompts import ControlPhrases, end_of_turn_ids, strip_end_of_turn
from sdzero.rewards import Verifier
from sdzero.tasks.lab import lab_reward


def score(function, sample, problem, sampling):
    return Verifier.of(function).score([sample], [problem], sampling)[0]


@pytest.mark.parametrize("n, c, k", [(8, 0, 1), (8, 3, 1), (8, 3, 2), (8, 3, 8), (5, 5, 3), (6, 2, 4)])
def test_pass_at_k_equals_brute_force_over_all_subsets(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(4, 1, 0)


class RecordingGenerator(Generator):
    """The real sampler, also keeping the contexts it was asked to continue (to check the layout)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def sample(self, contexts, n=1, **kwargs):
        samples = super().sample(contexts, n, **kwargs)
        self.calls.append((contexts, samples))
        return samples


@pytest.mark.parametrize("feedback", ["reward", "wrong"])
def test_generate_then_revise_lays_out_phase1_contexts_and_counts_corrections(tmp_path, lab_model_and_tokenizer,
                                                                              feedback):
    model, tokenizer = lab_model_and_tokenizer
    torch.manual_seed(0)
    problems = [p.to_row() for p in sample_problems(6, split="eval", seed=1)]
    generator = RecordingGenerator(model, tokenizer, SamplingConfig(max_new_tokens=160, batch_size=64))
    phrases = ControlPhrases()
    report = evaluate_revision(generator, problems, lab_reward, phrases, k=2, feedback=feedback,
                               samples_path=tmp_path / "revise.jsonl", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "revise.jsonl").read_text().splitlines()]
    assert len(rows) == report["n_answers"] == 12

    (first_contexts, firsts), (revise_contexts, revisions) = generator.calls
    answers = [a for samples in firsts for a in samples]
    eot = end_of_turn_ids(tokenizer)
    for row, problem_context, answer, context, revision in zip(
            rows, [c for c in first_contexts for _ in range(2)], answers, revise_contexts, revisions):
        problem = next(p for p in problems if p["id"] == row["id"])
        assert row["response"] == answer.text and row["reward"] == score(lab_reward, answer, problem, generator.sampling)
        phrase = phrases.for_reward(row["reward"]) if feedback == "reward" else phrases.wrong
        assert row["phrase"] == phrase
        # Phase 1's layout: the same assistant turn, the answer without its end, then sep + P + sep
        assert context == problem_context + strip_end_of_turn(answer.ids, eot) + \
            tokenizer.encode("\n\n" + phrase + "\n\n", add_special_tokens=False)
        assert row["revision"] == revision[0].text
        assert row["revision_reward"] == score(lab_reward, revision[0], problem, generator.sampling)

    wrong = [r for r in rows if r["reward"] < 1]
    right = [r for r in rows if r["reward"] >= 1]
    assert report["initial_accuracy"] == pytest.approx(len(right) / 12)
    assert report["revised_accuracy"] == pytest.approx(sum(r["revision_reward"] for r in rows) / 12)
    assert report["n_wrong"] == len(wrong)
    if wrong:
        assert report["correction_rate"] == pytest.approx(sum(r["revision_reward"] for r in wrong) / len(wrong))
    if right:
        assert report["spoil_rate"] == pytest.approx(sum(1 - r["revision_reward"] for r in right) / len(right))
    assert report["initial_length"] == pytest.approx(sum(r["tokens"] for r in rows) / 12)
    assert report["revised_length"] == pytest.approx(sum(r["revision_tokens"] for r in rows) / 12)
    assert report["revised_length"] > 5  # the revisions say something


def test_generate_then_revise_refuses_unknown_feedback(lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    with pytest.raises(ValueError, match="unknown revision feedback"):
        evaluate_revision(Generator(model, tokenizer, SamplingConfig()), [{"id": "x", "problem": "p", "answer": "1"}],
                          lab_reward, ControlPhrases(), feedback="maybe")


def test_answers_cut_by_the_token_cap_score_by_the_configured_rule(lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    problems, _, _ = lab.problem_sets(1, 1, 1, seed=0)
    problem = problems[0]
    # a right answer that never reached its end-of-turn token
    cut = Sample(ids=[1], text=f"b: 1+1=2. Answer: {problem['answer']}", finished=False)
    assert score(lab_reward, cut, problem, SamplingConfig(unfinished_reward="zero")) == 0.0
    assert score(lab_reward, cut, problem, SamplingConfig(unfinished_reward="score")) == 1.0
    finished = Sample(ids=[1], text=cut.text, finished=True)
    assert score(lab_reward, finished, problem, SamplingConfig(unfinished_reward="zero")) == 1.0
    with pytest.raises(ValueError, match="unfinished_reward"):
        SamplingConfig(unfinished_reward="half").validate()
    # evaluation reports the share cut by the cap
    report = evaluate(Generator(model, tokenizer, SamplingConfig(max_new_tokens=4)), problems[:1], lab_reward, k=2,
                      progress=False)
    assert report["unfinished"] == 1.0 and report["accuracy"] == 0.0
