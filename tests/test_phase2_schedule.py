"""Phase 2 around the step, on the real lab model: keep-best, the gated teacher refresh, the teacher's
precision, and the per-step diagnostics in metrics.jsonl (the lab's gold digits through `diagnostics`). The
rules alone, on plain sequences, are in test_phase2_rules.py."""

import copy
import json
import random

import pytest
import torch
from sdzero import lab
from sdzero.distill import DistillConfig, distill, micro_batch_divergence
from sdzero.generation import Sample, SamplingConfig
from sdzero.lab.diagnostics import gold_digit_tokens, token_spans
from sdzero.lab.task import Problem, gold_digits, write_solution
from sdzero.modeling import Teacher
from sdzero.prompts import ControlPhrases, DistillLayout, generator_prompt_ids, token_pieces
from sdzero.tasks.lab import lab_reward
from sdzero.training import make_accelerator

SAMPLING = SamplingConfig(max_new_tokens=60)


def scripted_curve(accuracies):
    """An evaluate_fn that returns the given accuracies in turn and records the weights it was shown."""
    seen = []

    def evaluate(student):
        seen.append([p.detach().clone() for p in student.parameters()])
        return accuracies[len(seen) - 1]
    return evaluate, seen


def run(student, tokenizer, cfg, evaluate_fn, **kwargs):
    _, n2, _ = lab.problem_sets(1, 16, 1, seed=0)
    torch.manual_seed(0)  # the rollouts' sampling, so that two runs of one configuration agree
    return distill(student, tokenizer, n2, lab_reward, ControlPhrases(), SAMPLING, cfg, evaluate_fn=evaluate_fn,
                   progress=False, **kwargs)


def test_keep_best_ends_with_the_best_tracked_weights(lab_model_and_tokenizer):
    student, tokenizer = copy.deepcopy(lab_model_and_tokenizer[0]), lab_model_and_tokenizer[1]
    cfg = DistillConfig(prompts_per_step=4, micro_batch_size=4, max_steps=5, lr=1e-3, warmup_steps=1, eval_every=2)
    # evaluations at steps 0, 2, 4 and after the last step (5): the best is step 2
    evaluate_fn, seen = scripted_curve([0.3, 0.8, 0.5, 0.6])
    summary = run(student, tokenizer, cfg, evaluate_fn)
    assert [h["step"] for h in summary["history"]] == [0, 2, 4, 5]
    assert summary["best_step"] == 2 and summary["best_accuracy"] == 0.8
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), seen[1]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[1], seen[3])), "training did not move past step 2"

    plain = copy.deepcopy(lab_model_and_tokenizer[0])
    evaluate_fn, seen = scripted_curve([0.3, 0.8, 0.5, 0.6])
    run(plain, tokenizer, DistillConfig(**{**cfg.__dict__, "keep_best": False}), evaluate_fn)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), seen[3]))


def test_keep_best_survives_a_resume(tmp_path, lab_model_and_tokenizer):
    tokenizer = lab_model_and_tokenizer[1]
    cfg = DistillConfig(prompts_per_step=4, micro_batch_size=4, max_steps=4, lr=1e-3, warmup_steps=1, eval_every=2,
                        save_every=2)
    whole = copy.deepcopy(lab_model_and_tokenizer[0])
    run(whole, tokenizer, cfg, scripted_curve([0.3, 0.9, 0.1])[0], out_dir=tmp_path / "whole")
    # the same run stopped after step 2 (its checkpoint holds the best weights), then resumed to the end
    cut = copy.deepcopy(lab_model_and_tokenizer[0])
    run(cut, tokenizer, DistillConfig(**{**cfg.__dict__, "max_steps": 2}), scripted_curve([0.3, 0.9])[0],
        out_dir=tmp_path / "cut")
    resumed = copy.deepcopy(lab_model_and_tokenizer[0])
    summary = run(resumed, tokenizer, cfg, scripted_curve([0.1])[0], out_dir=tmp_path / "cut", resume=True)
    assert summary["best_step"] == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), whole.parameters()))


def test_gated_refresh_needs_a_gain_and_a_tail_that_held(lab_model_and_tokenizer):
    student, tokenizer = copy.deepcopy(lab_model_and_tokenizer[0]), lab_model_and_tokenizer[1]
    cfg = DistillConfig(prompts_per_step=4, micro_batch_size=4, max_steps=4, lr=1e-3, warmup_steps=1, eval_every=1,
                        refresh_margin=0.1, refresh_tail_growth=10.0, keep_best=False)
    # step 0: 0.5 is the reference; step 2 beats it by 0.2 (refresh, new reference 0.7); step 4 is only +0.05
    summary = run(student, tokenizer, cfg, scripted_curve([0.5, 0.55, 0.7, 0.72, 0.75])[0])
    assert summary["syncs"] == [2] and summary["teacher_version"] == 1
    with pytest.raises(ValueError, match="refresh_margin needs eval_every"):
        DistillConfig(refresh_margin=0.1).validate()


@pytest.fixture
def bf16_runtime(monkeypatch):
    """accelerate's runtime as `accelerate launch --mixed_precision bf16` sets it up (state is process-wide)."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(reset_partial_state=True)
    yield make_accelerator()
    AcceleratorState._reset_state(reset_partial_state=True)


def test_teacher_equal_to_the_student_gives_zero_divergence_under_bf16_autocast(lab_model_and_tokenizer,
                                                                                 bf16_runtime):
    """The path a GPU run takes (accelerate's bf16 autocast on the student), here on the CPU: a teacher
    computed outside the autocast differs from the identical student by bf16 rounding."""
    model, tokenizer = lab_model_and_tokenizer
    accelerator = bf16_runtime
    assert accelerator.mixed_precision == "bf16"
    teacher = Teacher(model)  # a frozen copy made before prepare, as in distill()
    student = accelerator.prepare(copy.deepcopy(model))
    layouts = []
    for problem in lab.problem_sets(1, 1, 4, seed=0)[2]:
        ids = generator_prompt_ids(tokenizer, problem["problem"]) + tokenizer.encode(
            write_solution(Problem.from_row(problem)), add_special_tokens=False)
        positions = list(range(len(ids) - 20, len(ids) - 1))
        # the same context on both sides, so teacher = student must give exactly zero
        layouts.append(DistillLayout(ids, ids, positions, positions, truncated=False))
    cfg = DistillConfig(top_k=64)
    inside, _ = micro_batch_divergence(student, teacher, layouts, tokenizer.pad_token_id, "cpu", cfg,
                                       autocast=accelerator.autocast)
    outside, _ = micro_batch_divergence(student, teacher, layouts, tokenizer.pad_token_id, "cpu", cfg)
    # zero up to float32 rounding of the two normalisations (~3e-8 here); bf16 against fp32 is ~1e-4
    assert inside.abs().max().item() < 1e-6
    assert outside.abs().max().item() > 1e-5, "the check cannot see a precision mismatch"


def test_metrics_carry_the_diagnostics(tmp_path, lab_model_and_tokenizer):
    student, tokenizer = copy.deepcopy(lab_model_and_tokenizer[0]), lab_model_and_tokenizer[1]
    cfg = DistillConfig(prompts_per_step=8, micro_batch_size=4, max_steps=2, lr=1e-4, warmup_steps=1)
    run(student, tokenizer, cfg, None, out_dir=tmp_path / "lab", diagnostics=gold_digit_tokens)
    rows = [json.loads(line) for line in (tmp_path / "lab" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert 0.0 <= row["sdzero/unfinished"] <= 1.0
        assert 0.0 < row["sdzero/entropy"] < torch.log(torch.tensor(float(len(tokenizer)))).item()
        assert 0.0 < row["sdzero/student_topk_mass"] <= 1.0 + 1e-6
        assert 0.5 < row["sdzero/teacher_gold_agreement"] <= 1.0
    # without diagnostics the same run has no agreement to report, and trains the same
    plain = copy.deepcopy(lab_model_and_tokenizer[0])
    run(plain, tokenizer, cfg, None, out_dir=tmp_path / "plain")
    plain_rows = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert not any("sdzero/teacher_gold_agreement" in row for row in plain_rows)
    assert [row["loss"] for row in plain_rows] == [row["loss"] for row in rows]
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), plain.parameters()))


def test_gold_digits_and_their_tokens(lab_tokenizer):
    problem = Problem((3, 5, 2, 8))
    # first attempt slips at c (8+2=1), the second is right
    text = "b: 3+5=8, c: 8+2=1, d: 1+8=9. Answer: 9\n\nWait, this response is not correct, let me start over.\n\n" \
           "b: 3+5=8, c: 8+2=0, d: 0+8=8. Answer: 8"
    digits = gold_digits(text, problem)
    assert len(digits) == 18
    gold = [3, 5, 8, 8, 2, 0, 0, 8, 8]
    assert [d for _, d in digits] == gold + gold
    assert [text[i] for i, _ in digits][:9] == list("358821189")
    ids = lab_tokenizer.encode(text, add_special_tokens=False) + [lab_tokenizer.eos_token_id]
    tokens = gold_digit_tokens(lab_tokenizer, Sample(ids=ids, text=text, finished=True), problem.to_row())
    assert len(tokens) == 18
    assert [lab_tokenizer.decode([ids[t]]) for t, _ in tokens][:9] == list("358821189")
    assert [lab_tokenizer.decode([token]) for _, token in tokens] == [str(d) for d in gold + gold]
    with pytest.raises(ValueError, match="not a lab problem"):
        gold_digit_tokens(lab_tokenizer, Sample(ids=ids, text=text, finished=True), {"problem": "x", "id": 1})


def test_token_spans_are_the_growing_prefix_spans(lab_tokenizer, tmp_path):
    """token_spans decodes each token once where that gives the ranges of `token_pieces` (which decodes every
    growing prefix): the lab's answers, random token ids (partial UTF-8 among them), and a byte-level
    tokenizer of another vocabulary on text with multi-byte characters."""
    from tiny import build_tiny_model
    from transformers import AutoTokenizer

    problem = Problem((3, 5, 2, 8))
    answer = lab_tokenizer.encode(write_solution(problem), add_special_tokens=False) + [lab_tokenizer.eos_token_id]
    one_by_one = "".join(lab_tokenizer.decode([i], skip_special_tokens=True) for i in answer)
    assert one_by_one == lab_tokenizer.decode(answer, skip_special_tokens=True)  # a lab answer takes the fast way
    assert token_spans(lab_tokenizer, answer) == token_pieces(lab_tokenizer, answer)[2]

    tiny = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "tiny"))
    rng = random.Random(0)
    for tokenizer in (lab_tokenizer, tiny):
        texts = ["Wait, 3+5=8 \u00e9t\u00e9 \u20ac 12 \U0001f600.", "Let me rephrase: \u00fc\u00f6 2 + 3 = 5"]
        cases = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        cases += [[rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 30))] for _ in range(300)]
        tiled = 0
        for ids in cases:
            assert token_spans(tokenizer, ids) == token_pieces(tokenizer, ids)[2], ids
            tiled += "".join(tokenizer.decode([i], skip_special_tokens=True) for i in ids) == \
                tokenizer.decode(ids, skip_special_tokens=True)
        assert 0 < tiled < len(cases)  # both ways were taken


def test_the_teacher_context_defaults_to_the_teachers_positions(tmp_path, lab_model_and_tokenizer):
    """teacher_max_length unset cuts at the teacher's max_position_embeddings (here shrunk to 80, so
    that 60-token answers read twice overflow it); a limit past it is refused before any step."""
    student, tokenizer = copy.deepcopy(lab_model_and_tokenizer[0]), lab_model_and_tokenizer[1]
    student.config.max_position_embeddings = 80
    cfg = DistillConfig(prompts_per_step=8, micro_batch_size=8, max_steps=1, lr=1e-4, warmup_steps=1)
    run(student, tokenizer, cfg, None, out_dir=tmp_path / "short")
    row = json.loads((tmp_path / "short" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["sdzero/truncated"] + row["sdzero/masked_out"] > 0

    student.config.max_position_embeddings = 512
    run(student, tokenizer, cfg, None, out_dir=tmp_path / "long")
    row = json.loads((tmp_path / "long" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["sdzero/truncated"] == row["sdzero/masked_out"] == 0

    with pytest.raises(ValueError, match="teacher_max_length=513 is past the teacher's 512 positions"):
        run(student, tokenizer, DistillConfig(teacher_max_length=513), None)


def test_rollouts_are_written_every_n_steps_from_the_steps_own_values(tmp_path, lab_model_and_tokenizer):
    student, tokenizer = copy.deepcopy(lab_model_and_tokenizer[0]), lab_model_and_tokenizer[1]
    cfg = DistillConfig(prompts_per_step=6, micro_batch_size=4, max_steps=5, lr=1e-4, warmup_steps=1,
                        rollouts_every=2)
    run(student, tokenizer, cfg, None, out_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2] * 6 + [4] * 6
    _, n2, _ = lab.problem_sets(1, 16, 1, seed=0)
    by_id = {p["id"]: p for p in n2}
    metrics = {row["step"]: row for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    for step in (2, 4):
        these = [row for row in rows if row["step"] == step]
        for row in these:
            assert row["reward"] == (lab_reward(row["response"], by_id[row["id"]]) if row["finished"] else 0.0)
            assert row["finished"] or row["tokens"] == SAMPLING.max_new_tokens
            d = row["divergence"]
            assert 0.0 <= d["mean"] <= d["max"]
            assert len(d["top_positions"]) == len(d["top_tokens"]) == min(5, row["tokens"])
            assert all(0 <= t < row["tokens"] for t in d["top_positions"])
            assert all(piece in row["response"] for piece in d["top_tokens"] if piece != tokenizer.eos_token)
        # the token-weighted mean of the rollouts' means is the step's loss (no rollout is cut here)
        assert not any(row["truncated"] for row in these)
        total = sum(row["divergence"]["mean"] * row["tokens"] for row in these)
        assert total / sum(row["tokens"] for row in these) == pytest.approx(metrics[step]["sdzero/kl"], rel=1e-5)
        assert metrics[step]["sdzero/reward"] == pytest.approx(sum(row["reward"] for row in these) / 6)
    off = copy.deepcopy(lab_model_and_tokenizer[0])
    run(off, tokenizer, DistillConfig(**{**cfg.__dict__, "rollouts_every": None}), None, out_dir=tmp_path / "off")
    assert not (tmp_path / "off" / "rollouts.jsonl").exists()
    # the record draws nothing: the weights are those of the run that writes none
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), off.parameters()))


def test_rollouts_of_a_resumed_run_are_those_of_an_uninterrupted_one(tmp_path, lab_model_and_tokenizer):
    tokenizer = lab_model_and_tokenizer[1]
    cfg = DistillConfig(prompts_per_step=4, micro_batch_size=4, max_steps=4, lr=1e-3, warmup_steps=1,
                        save_every=2, rollouts_every=1)
    run(copy.deepcopy(lab_model_and_tokenizer[0]), tokenizer, cfg, None, out_dir=tmp_path / "whole")
    # stopped after step 3, past its last checkpoint (step 2): the resumed run redoes step 3
    run(copy.deepcopy(lab_model_and_tokenizer[0]), tokenizer, DistillConfig(**{**cfg.__dict__, "max_steps": 3}),
        None, out_dir=tmp_path / "cut")
    assert {json.loads(line)["step"] for line in (tmp_path / "cut" / "rollouts.jsonl").read_text().splitlines()} \
        == {1, 2, 3}
    run(copy.deepcopy(lab_model_and_tokenizer[0]), tokenizer, cfg, None, out_dir=tmp_path / "cut", resume=True)
    assert (tmp_path / "cut" / "rollouts.jsonl").read_bytes() == (tmp_path / "whole" / "rollouts.jsonl").read_bytes()


def test_first_copy_keeps_end_reaches_the_teachers_context(tmp_path, lab_model_and_tokenizer):
    """The same rollouts (same seed) scored by a teacher that reads y with and without its end token: the
    layout option of DistillConfig is the one Phase 2's step uses, so the divergence changes and nothing else."""
    rows = {}
    for keeps_end in (False, True):
        student, tokenizer = copy.deepcopy(lab_model_and_tokenizer[0]), lab_model_and_tokenizer[1]
        cfg = DistillConfig(prompts_per_step=8, micro_batch_size=8, max_steps=1, lr=1e-4, warmup_steps=1,
                            first_copy_keeps_end=keeps_end)
        run(student, tokenizer, cfg, None, out_dir=tmp_path / str(keeps_end))
        rows[keeps_end] = json.loads((tmp_path / str(keeps_end) / "metrics.jsonl").read_text().splitlines()[0])
    assert rows[False]["sdzero/response_len"] == rows[True]["sdzero/response_len"]
    assert rows[False]["sdzero/reward"] == rows[True]["sdzero/reward"]
    assert rows[False]["sdzero/kl"] != pytest.approx(rows[True]["sdzero/kl"], rel=1e-3)
