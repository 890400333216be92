import json
from random import Random

import pytest

from sdzero import lab
from sdzero.cli import main
from sdzero.lab.task import (Problem, error_counts, extract_answer, first_error_kind, first_wrong_step, reward,
                             sample_problems, write_solution)


def test_gold_solution_is_right_and_checked_exactly():
    problem = Problem((3, 5, 2, 8))
    solution = write_solution(problem)
    assert problem.text == "Running sum mod 10 of a=3 b=5 c=2 d=8"
    assert solution == "b: 3+5=8, c: 8+2=0, d: 0+8=8. Answer: 8"
    assert Problem.from_row(problem.to_row()) == problem
    assert reward(solution, problem) == 1.0
    assert reward(solution.replace("Answer: 8", "Answer: 9"), problem) == 0.0
    assert first_wrong_step(solution, problem) is None


def test_first_wrong_step_points_at_the_slip():
    problem = Problem((3, 5, 2, 8))
    wrong = "b: 3+5=8, c: 8+2=1, d: 1+8=9. Answer: 9"
    start, end = first_wrong_step(wrong, problem)
    assert wrong[start:end] == "c: 8+2=1"
    missing = "b: 3+5=8, c: 8+2=0. Answer: 0"
    start, end = first_wrong_step(missing, problem)
    assert start >= missing.index("c: 8+2=0") + 8
    # only the first attempt counts: a right revision after a blank line does not hide the slip
    revised = wrong + "\n\nWait, this response is not correct, let me start over.\n\n" + write_solution(problem)
    assert reward(revised, problem) == 1.0
    assert revised[slice(*first_wrong_step(revised, problem))] == "c: 8+2=1"


def test_slips_happen_only_on_carry_steps():
    rng = Random(0)
    for problem in sample_problems(300, split="train", seed=1):
        noisy = write_solution(problem, rng, slip_rate=0.5)
        span = first_wrong_step(noisy, problem)
        if span is not None:
            step = noisy[span[0]:span[1]].split(": ")[1]
            a, b = int(step[0]), int(step[2])
            assert a + b >= 10


def test_eval_and_train_problems_are_disjoint_and_seeded():
    train = {p.id for p in sample_problems(3000, split="train", seed=0)}
    held_out = {p.id for p in sample_problems(300, split="eval", seed=0)}
    assert len(train) == 3000 and len(held_out) == 300 and not train & held_out
    assert sample_problems(5, split="train", seed=4) == sample_problems(5, split="train", seed=4)
    n1, n2, ev = lab.problem_sets(100, 200, 50, seed=3)
    assert not {p["id"] for p in n1} & {p["id"] for p in n2}
    with pytest.raises(ValueError, match="split must be"):
        sample_problems(1, split="test", seed=0)


def test_answer_extraction_takes_the_last_answer():
    assert extract_answer("Answer: 3\n\nWait...\n\nAnswer: 7") == "7"
    assert extract_answer("no answer here") is None


def test_pretrain_builds_a_loadable_model_with_a_chat_template(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdzero.lab.model import PretrainConfig, pretrain

    pretrain(tmp_path, PretrainConfig(n_documents=300, steps=2, batch_size=4, hidden_size=32, num_layers=1,
                                      num_heads=2, intermediate_size=64), progress=False, device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # digits are single tokens, so every step of a solution is visible to the model digit by digit
    assert tokenizer.tokenize("a=12")[-2:] == ["1", "2"]


FOUR = Problem((3, 5, 2, 8))  # b: 3+5=8, c: 8+2=0, d: 0+8=8. Answer: 8


@pytest.mark.parametrize("completion, kind", [
    ("b: 3+5=8, c: 8+2=0, d: 0+8=8. Answer: 8", None),
    ("b: 3+6=9, c: 9+2=1, d: 1+8=9. Answer: 9", "operand"),        # 6 is not b's digit
    ("b: 3+5=8, c: 7+2=9, d: 9+8=7. Answer: 7", "running sum"),    # 7 is not the running sum 8
    ("b: 3+5=9, c: 9+2=1, d: 1+8=9. Answer: 9", "sum"),            # 3+5 is not 9 (no carry)
    ("b: 3+5=8, c: 8+2=1, d: 1+8=9. Answer: 9", "carry slip"),     # 8+2 reaches 10: one too many
    ("b: 3+5=8, c: 8+2=2, d: 2+8=0. Answer: 0", "sum"),            # 8+2 is off by two, not a slip
    ("b: 3+5=8, c: 8+2=0, d: 0+8=8, e: 8+1=9. Answer: 9", "extra step"),
    ("b: 3+5=8, c: 8+2=0. Answer: 0", "ending"),                    # a step is missing
    ("b: 3+5=8, c: 8+2=0, d: 0+8=8. Answer: 7", "ending"),
    # only the first attempt counts: a right revision after a wrong first attempt keeps its error
    ("b: 3+5=9, c: 9+2=1, d: 1+8=9. Answer: 9\n\nWait, this response is not correct, let me start over.\n\n"
     "b: 3+5=8, c: 8+2=0, d: 0+8=8. Answer: 8", "sum"),
])
def test_first_error_kind(completion, kind):
    assert first_error_kind(completion, FOUR) == kind


def test_lab_errors_counts_the_wrong_answers_of_a_samples_file(tmp_path, capsys):
    rows = [("b: 3+6=9, c: 9+2=1, d: 1+8=9. Answer: 9", 0.0),
            ("b: 3+5=9, c: 9+2=1, d: 1+8=9. Answer: 9", 0.0),
            ("b: 3+5=9, c: 9+2=1, d: 1+8=9. Answer: 9\n\nLet me start over.\n\nb: 3+5=8, c: 8+2=0, d: 0+8=8. Answer: 8",
             1.0),
            ("b: 3+5=8, c: 8+2=0, d: 0+8=8. Answer: 8\n\nLet me rephrase.\n\nb: 3+5=8, c: 8+2=1. Answer: 1", 0.0)]
    path = tmp_path / "sdzero.jsonl"
    path.write_text("".join(json.dumps({"id": FOUR.id, "response": r, "reward": w}) + "\n" for r, w in rows))
    counts = error_counts(path)
    assert counts["answers"] == 4 and counts["wrong"] == 3
    assert counts["kinds"] == {"operand": 1, "running sum": 0, "carry slip": 0, "sum": 1, "extra step": 0,
                               "ending": 0, "first attempt right": 1}
    assert main(["lab", "errors", str(path)]) == 0
    assert "4 answers, 3 wrong" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text().splitlines()[0] + "\n" + json.dumps({"id": "gsm8k-3", "response": ""}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not a lab evaluation sample"):
        error_counts(bad)
