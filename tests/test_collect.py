"""Phase 1 collection on the real lab model: filtering, de-duplication, incremental writes."""

import json

import pytest

from sdzero import lab
from sdzero.collect import CollectConfig, collect, is_degenerate, keep_revision
from sdzero.generation import Generator, Sample, SamplingConfig
from sdzero.prompts import ControlPhrases
from sdzero.tasks.lab import lab_reward
from sdzero.training import read_jsonl


def test_keep_revision_filters():
    cfg, phrases = CollectConfig(), ControlPhrases()

    def keep(text, reward=1.0, *, first_finished=True, finished=True, config=cfg):
        first = Sample(ids=[1, 2], text="b: 1+2=3. Answer: 3", finished=first_finished)
        return keep_revision(first, Sample(ids=[3], text=text, finished=finished), reward, phrases, config)

    assert keep("1+2=3. Answer: 3")
    assert not keep("1+2=3. Answer: 3", 0.0)
    assert not keep("You're absolutely right! 1+2=3. Answer: 3")
    assert keep("You're absolutely right! 1+2=3. Answer: 3", config=CollectConfig(drop_sycophantic=False))
    assert not keep("Answer: 3" + " 3 3" * 30)
    assert is_degenerate("ab" * 20) and not is_degenerate("1+2=3, 3+4=7, 7+1=8. Answer: 8")
    # a revision (or a first answer) cut by the token cap is not kept, whatever its last "Answer:" says
    assert not keep("1+2=3. Answer: 3", finished=False)
    assert not keep("1+2=3. Answer: 3", first_finished=False)
    # a control phrase inside the revision (or the first answer) makes SRT's target a chain of attempts
    once = f"1+2=4. Answer: 4\n\n{phrases.wrong}\n\n1+2=3. Answer: 3"
    chain = f"1+2=3. Answer: 3\n\n{phrases.correct}\n\n1+2=3. Answer: 3\n\n{phrases.correct}\n\n1+2=3. Answer: 3"
    assert not keep(once) and not keep(chain)
    assert keep(once, config=CollectConfig(max_control_phrases=1))
    assert not keep(chain, config=CollectConfig(max_control_phrases=1))
    restarted = Sample(ids=[1], text=once, finished=True)
    assert not keep_revision(restarted, Sample(ids=[3], text="1+2=3. Answer: 3", finished=True), 1.0, phrases, cfg)


def _collect(tmp_path, model_and_tokenizer, cfg, problems):
    model, tokenizer = model_and_tokenizer
    generator = Generator(model, tokenizer, SamplingConfig(max_new_tokens=120, batch_size=64))
    return collect(generator, problems, lab_reward, ControlPhrases(), tmp_path, cfg, progress=False)


@pytest.mark.slow
def test_collection_keeps_only_verified_distinct_revisions_and_resumes(tmp_path, lab_model_and_tokenizer):
    problems, _, _ = lab.problem_sets(24, 1, 1, seed=5)
    cfg = CollectConfig(revisions_per_answer=3, chunk_size=10)
    summary = _collect(tmp_path, lab_model_and_tokenizer, cfg, problems)
    attempts, kept = read_jsonl(tmp_path / "attempts.jsonl"), read_jsonl(tmp_path / "revisions.jsonl")
    assert [a["id"] for a in attempts] == [p["id"] for p in problems]
    assert summary["problems"] == 24 and summary["generations"] == 24 + 24 * 3
    assert summary["kept"] == len(kept) > 0
    by_id = {p["id"]: p for p in problems}
    for row in kept:
        assert lab_reward(row["revised_text"], by_id[row["id"]]) == 1.0
        assert row["control_phrase"] == ControlPhrases().for_reward(row["init_reward"])
        assert lab_reward(row["init_text"], by_id[row["id"]]) == row["init_reward"]
    assert len({(r["id"], tuple(r["revised_ids"])) for r in kept}) == len(kept)
    assert sum(a["kept"] for a in attempts) == len(kept)

    # A second run over the same directory finds every problem done and adds nothing.
    again = _collect(tmp_path, lab_model_and_tokenizer, cfg, problems)
    assert again == summary
    assert len(read_jsonl(tmp_path / "revisions.jsonl")) == len(kept)


def test_official_option_revises_only_wrong_answers(tmp_path, lab_model_and_tokenizer):
    problems, _, _ = lab.problem_sets(16, 1, 1, seed=6)
    summary = _collect(tmp_path, lab_model_and_tokenizer, CollectConfig(revise_correct=False), problems)
    wrong = sum(1 for a in read_jsonl(tmp_path / "attempts.jsonl") for r in a["rewards"] if r < 1)
    assert summary["revisions_sampled"] == 3 * wrong
    assert all(row["init_reward"] == 0.0 for row in read_jsonl(tmp_path / "revisions.jsonl"))


@pytest.mark.slow
def test_interrupted_collection_resumes_without_duplicates(tmp_path, lab_model_and_tokenizer):
    problems, _, _ = lab.problem_sets(20, 1, 1, seed=7)
    cfg = CollectConfig(chunk_size=5)
    _collect(tmp_path, lab_model_and_tokenizer, cfg, problems[:10])  # as if stopped after two chunks
    summary = _collect(tmp_path, lab_model_and_tokenizer, cfg, problems)
    ids = [a["id"] for a in read_jsonl(tmp_path / "attempts.jsonl")]
    assert ids == [p["id"] for p in problems] and summary["problems"] == 20
    assert json.loads((tmp_path / "attempts.jsonl").read_text().splitlines()[-1])["id"] == problems[-1]["id"]


@pytest.mark.slow
def test_every_answer_is_on_disk_kept_or_not(tmp_path, lab_model_and_tokenizer):
    problems, _, _ = lab.problem_sets(16, 1, 1, seed=8)
    cfg = CollectConfig(revisions_per_answer=3, chunk_size=8)
    _collect(tmp_path, lab_model_and_tokenizer, cfg, problems)
    by_id = {p["id"]: p for p in problems}
    kept_rows = read_jsonl(tmp_path / "revisions.jsonl")
    rejected = unfinished = 0
    for line in read_jsonl(tmp_path / "attempts.jsonl"):
        problem = by_id[line["id"]]
        assert [a["reward"] for a in line["answers"]] == line["rewards"]
        assert sum(r["kept"] for a in line["answers"] for r in a["revisions"]) == line["kept"]
        assert sum(1 + len(a["revisions"]) for a in line["answers"]) == line["generations"]
        assert sum(a["tokens"] + sum(r["tokens"] for r in a["revisions"]) for a in line["answers"]) \
            == line["sampled_tokens"]
        for answer in line["answers"]:
            assert len(answer["revisions"]) == 3  # revise_correct: every first answer is revised
            for sample in [answer, *answer["revisions"]]:
                # an answer that did not finish ran to the token cap (120) and scores 0 (unfinished_reward)
                assert sample["finished"] or sample["tokens"] == 120
                assert sample["reward"] == (lab_reward(sample["text"], problem) if sample["finished"] else 0.0)
            unfinished += sum(not sample["finished"] for sample in [answer, *answer["revisions"]])
            for revision in answer["revisions"]:
                rejected += not revision["kept"]
        # the revisions marked kept are the ones revisions.jsonl holds (a repeat of a kept one is not kept)
        assert sorted(r["text"] for a in line["answers"] for r in a["revisions"] if r["kept"]) \
            == sorted(r["revised_text"] for r in kept_rows if r["id"] == line["id"])
    assert rejected > 0 and kept_rows and unfinished > 0, "the example needs kept, rejected and unfinished answers"


@pytest.mark.slow
def test_a_resumed_collection_writes_the_same_bytes(tmp_path, lab_model_and_tokenizer):
    problems, _, _ = lab.problem_sets(20, 1, 1, seed=9)
    cfg = CollectConfig(chunk_size=5)
    model, tokenizer = lab_model_and_tokenizer
    generator = Generator(model, tokenizer, SamplingConfig(max_new_tokens=120, batch_size=64))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    collect(generator, problems, lab_reward, ControlPhrases(), straight, cfg, progress=False, seed=3)
    collect(generator, problems[:10], lab_reward, ControlPhrases(), resumed, cfg, progress=False, seed=3)
    collect(generator, problems, lab_reward, ControlPhrases(), resumed, cfg, progress=False, seed=3)
    for name in ("attempts.jsonl", "revisions.jsonl"):
        assert (resumed / name).read_bytes() == (straight / name).read_bytes()
    assert "answers" in read_jsonl(straight / "attempts.jsonl")[0]
