"""reasoning-gym as a data source: generated problem sets (disjoint, the held-out set fixed across run seeds),
each generator's own score_answer behind the answer rules, the one-line errors, row sources, and evaluation's
count of answers with nothing to extract. Completions are plain strings: no language model is loaded."""

import json

import pytest

from sdzero import data as data_module
from sdzero.config import load_config
from sdzero.data import DataConfig, load_problem_sets
from sdzero.evaluate import evaluate
from sdzero.generation import Generator, Sample, SamplingConfig
from sdzero.rewards import make_verifier
from sdzero.tasks import reasoning_gym as gym
from sdzero.tasks.lab import lab_reward
from sdzero.tasks.math import MATH_INSTRUCTION

CHAIN_SUM = {"min_terms": 2, "max_terms": 2}


def gym_data(name="chain_sum", options=None, **fields) -> DataConfig:
    return DataConfig(source=f"reasoning-gym:{name}", options=CHAIN_SUM if options is None else options, **fields)


def verdicts(texts: list[str], problems: list[dict], task="reasoning-gym") -> list[float]:
    samples = [Sample(ids=[], text=text, finished=True) for text in texts]
    return make_verifier(task).score(samples, problems, SamplingConfig())


def ids(problems: list[dict]) -> set[str]:
    return {p["id"] for p in problems}


# ------------------------------------------------------------------------------------------
# Problem sets


def test_sets_are_disjoint_and_the_held_out_set_is_the_same_for_every_run_seed():
    runs = {seed: load_problem_sets(gym_data(), "reasoning-gym", 40, 60, 30, seed) for seed in (0, 1, 7)}
    for sets in runs.values():
        assert (len(sets.n1), len(sets.n2), len(sets.held_out)) == (40, 60, 30)
        questions = [p["question"] for p in sets.n1 + sets.n2 + sets.held_out]
        assert len(set(questions)) == len(questions) == 130  # disjoint by question text, not only by id
        assert all(p["problem"].startswith(p["question"]) and p["answer_rule"] == "answer-tags"
                   for p in sets.n1 + sets.held_out)
    assert [p["id"] for p in runs[0].held_out] == [p["id"] for p in runs[1].held_out] == \
        [p["id"] for p in runs[7].held_out]
    assert ids(runs[0].n1) != ids(runs[1].n1)  # the training problems come from the run seed
    again = load_problem_sets(gym_data(), "reasoning-gym", 40, 60, 30, 1)
    assert [p["id"] for p in again.n1 + again.n2] == [p["id"] for p in runs[1].n1 + runs[1].n2]


def test_repeated_questions_are_dropped_and_counted():
    # leg_counting with one animal of few kinds asks the same questions again and again
    options = {"min_animals": 1, "max_animals": 1, "max_instances": 2}
    sets = load_problem_sets(gym_data("leg_counting", options), "reasoning-gym", 5, 5, 5, 0)
    questions = [p["question"] for p in sets.n1 + sets.n2 + sets.held_out]
    assert len(set(questions)) == 15
    assert sets.skipped["train"]["reasons"]["same question as an earlier problem"] > 0


def test_empty_sets_are_allowed():
    sets = load_problem_sets(gym_data(), "reasoning-gym", 3, 0, 0, 0)
    assert (len(sets.n1), sets.n2, sets.held_out) == (3, [], [])


def test_rows_carry_what_scoring_needs_as_json():
    sets = load_problem_sets(gym_data(), "reasoning-gym", 2, 2, 2, 0)
    row = sets.held_out[0]
    assert json.loads(json.dumps(row)) == row  # metadata tuples became lists
    assert row["generator"] == "chain_sum" and row["options"] == CHAIN_SUM and row["metadata"]["num_terms"] == 2
    assert row["id"].startswith("chain_sum-")


def test_split_json_records_the_source_and_refuses_other_options(tmp_path):
    data = gym_data(size=50)
    sets = load_problem_sets(data, "reasoning-gym", 10, 10, 10, 3, record_dir=tmp_path)
    record = json.loads((tmp_path / "split.json").read_text())
    assert record["source"] == {"source": "reasoning-gym:chain_sum", "options": CHAIN_SUM, "size": 50}
    assert record["held_out"] == [p["id"] for p in sets.held_out] and record["task"] == "reasoning-gym"
    load_problem_sets(data, "reasoning-gym", 10, 10, 10, 3, record_dir=tmp_path)  # the same split: accepted
    with pytest.raises(ValueError, match="split was drawn with source"):
        load_problem_sets(gym_data(options={"min_terms": 3, "max_terms": 3}, size=50), "reasoning-gym",
                          10, 10, 10, 3, record_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# Scoring: gold answers pass, wrong and partly right answers fail


@pytest.mark.parametrize("name, options", [
    ("chain_sum", CHAIN_SUM), ("basic_arithmetic", {}), ("leg_counting", {}), ("gsm_symbolic", {}),
    ("countdown", {}), ("word_sorting", {}),
])
def test_gold_answers_score_one_and_wrong_answers_zero(name, options):
    sets = load_problem_sets(gym_data(name, options), "reasoning-gym", 3, 3, 3, 0)
    problems = sets.n1 + sets.n2 + sets.held_out
    gold = [gym.reference_completion(p["answer"], "answer-tags") for p in problems]
    assert verdicts(gold, problems) == [1.0] * len(problems)
    wrong = [gym.reference_completion("1" if p["answer"] == "0" else "0", "answer-tags") for p in problems]
    assert verdicts(wrong, problems) == [0.0] * len(problems)


@pytest.mark.parametrize("rule", ["boxed", "last-number"])
def test_every_rule_reads_its_own_reference_completion(rule):
    sets = load_problem_sets(gym_data(answer_rule=rule), "reasoning-gym", 10, 10, 10, 0)
    problems = sets.n1 + sets.n2 + sets.held_out
    assert any(p["answer"].startswith("-") for p in problems)  # negative answers are read with their sign
    assert all(p["problem"].endswith(gym.RULE_INSTRUCTIONS[rule]) for p in problems)
    gold = [gym.reference_completion(p["answer"], rule) for p in problems]
    assert verdicts(gold, problems) == [1.0] * len(problems)
    # the other rule's format is not read: an answer in tags is nothing to a boxed rule (a last-number rule
    # still finds the number, so it is given a text without one)
    other = [f"<answer>{p['answer']}</answer>" if rule == "boxed" else "I do not know." for p in problems]
    assert verdicts(other, problems) == [0.0] * len(problems)


def test_partial_credit_is_a_wrong_answer():
    sets = load_problem_sets(gym_data(), "reasoning-gym", 1, 1, 1, 0)
    problem = sets.held_out[0]
    text = f"<answer>{problem['answer']} apples</answer>"
    partial = gym.scorer("chain_sum", CHAIN_SUM).score_answer(gym.extract(text, problem), problem)
    assert 0.0 < partial < 1.0
    assert verdicts([text], [problem]) == [0.0]


def test_the_scoring_dataset_is_built_once_per_generator_and_options():
    assert gym.scorer("chain_sum", {"max_terms": 2, "min_terms": 2}) is gym.scorer("chain_sum", CHAIN_SUM)
    assert gym.scorer("chain_sum", {}) is not gym.scorer("chain_sum", CHAIN_SUM)


# ------------------------------------------------------------------------------------------
# Extraction rules


@pytest.mark.parametrize("text, expected", [
    ("<answer>7</answer>", "7"),
    ("first <answer>3</answer>, then <answer> 12 </answer> done", "12"),
    ("<answer>a\nb</answer> trailing text", "a\nb"),
    ("<answer>1</answer> and an unclosed <answer>2", "1"),
    ("<answer><answer>5</answer>", "5"),
    ("no tags here", None),
    ("<answer>unclosed", None),
])
def test_answer_tags_rule(text, expected):
    assert gym.extract_answer_tags(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{ {a, {b}} }", "{a, {b}}"),
    ("cut off \\boxed{12", None),
    ("nothing", None),
])
def test_boxed_rule(text, expected):
    assert gym.extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("4 - 1 = 3", "3"),
    ("the sum is -633.", "-633"),
    ("x = -2.75", "-2.75"),
    ("about +5 degrees", "5"),
    ("it costs 1,234.50 dollars", "1234.50"),
    ("the list 1,2,3", "3"),
    ("10-4", "4"),  # a minus between numbers is subtraction, not a sign
    ("half is .5", "0.5"),
    ("minus sign \u22127", "-7"),
    ("no digits at all", None),
])
def test_last_number_rule(text, expected):
    assert gym.extract_last_number(text) == expected


def test_reference_completion_for_last_number_needs_a_number():
    assert gym.extract_last_number(gym.reference_completion("-12.5", "last-number")) == "-12.5"
    with pytest.raises(ValueError, match="not a plain number"):
        gym.reference_completion("apple, pear", "last-number")


# ------------------------------------------------------------------------------------------
# One-line errors


@pytest.mark.parametrize("data, task, match", [
    (DataConfig(source="reasoning-gym:chain_summ"), "reasoning-gym", "unknown reasoning-gym generator 'chain_summ'"),
    (DataConfig(source="reasoning-gym"), "reasoning-gym", "names no generator"),
    (gym_data(options={"min_terms": 0}), "reasoning-gym", "data.options: chain_sum refuses"),
    (gym_data(options={"colour": "red"}), "reasoning-gym", "data.options: chain_sum refuses .*colour"),
    (gym_data(options={"seed": 3}), "reasoning-gym", "data.options: 'seed'"),
    (gym_data(size=20), "reasoning-gym", "data.size 20 is too small"),
    (gym_data(), "math", "needs task 'reasoning-gym'"),
    (gym_data(path="problems.jsonl"), "reasoning-gym", "data.path and data.source are both set"),
    (gym_data(answer_rule="xml"), "reasoning-gym", "data.answer_rule: unknown rule 'xml'"),
    (DataConfig(source="nowhere:x"), "math", "data.source: unknown source 'nowhere:x'"),
    (DataConfig(), "reasoning-gym", "task 'reasoning-gym' needs data.source"),
])
def test_bad_settings_are_one_line_errors(data, task, match):
    with pytest.raises(ValueError, match=match) as err:
        load_problem_sets(data, task, 10, 10, 10, 0)
    assert "\n" not in str(err.value)


def test_too_few_distinct_questions_name_data_size():
    options = {"min_animals": 1, "max_animals": 1, "max_instances": 1}
    with pytest.raises(ValueError, match="data.size: leg_counting .* made only"):
        load_problem_sets(gym_data("leg_counting", options, size=30), "reasoning-gym", 10, 10, 10, 0)


def test_the_config_refuses_bad_sources_before_anything_loads():
    ok = ["task=reasoning-gym", "data.source=reasoning-gym:chain_sum", "data.options={min_terms: 2, max_terms: 2}"]
    assert load_config(None, ok).data.source == "reasoning-gym:chain_sum"
    for extra, match in [("task=math", "needs task 'reasoning-gym'"), ("data.path=x.jsonl", "both set"),
                         ("data.options={max_terms: 0}", "data.options: chain_sum refuses")]:
        with pytest.raises(ValueError, match=match):
            load_config(None, ok + [extra])


# ------------------------------------------------------------------------------------------
# Row sources


def number_rows(data: DataConfig) -> list[tuple[str, dict]]:
    """A row source: `data.size` doubling problems (the test registers it in data.SOURCES)."""
    return [(f"numbers row {i}", {"id": f"n{i}", "problem": f"What is 2 * {i}?", "answer": str(2 * i)})
            for i in range(1, (data.size or 30) + 1)]


def test_a_row_source_is_read_validated_and_split_like_a_file(monkeypatch, tmp_path):
    monkeypatch.setitem(data_module.SOURCES, "numbers", f"{__name__}:number_rows")
    data = DataConfig(source="numbers", size=40)
    sets = load_problem_sets(data, "math", 10, 10, 10, 0, record_dir=tmp_path)
    assert len(ids(sets.n1) | ids(sets.n2) | ids(sets.held_out)) == 30
    assert sets.n1[0]["problem"].endswith(MATH_INSTRUCTION)
    assert json.loads((tmp_path / "split.json").read_text())["source"] == {"source": "numbers", "options": {},
                                                                           "size": 40}
    other = load_problem_sets(data, "math", 10, 10, 10, 1)
    assert ids(other.held_out) == ids(sets.held_out) and ids(other.n1) != ids(sets.n1)
    with pytest.raises(ValueError, match="problem pool has 20 problems"):
        load_problem_sets(DataConfig(source="numbers", size=20), "math", 10, 10, 10, 0)


# ------------------------------------------------------------------------------------------
# Evaluation counts answers with nothing to extract


class ScriptedGenerator(Generator):
    """A generator whose answers are given texts (the prompts are still built with a real tokenizer)."""

    def __init__(self, tokenizer, texts: list[str]):
        super().__init__(None, tokenizer, SamplingConfig())
        self.texts = texts

    def sample(self, contexts, n=1, **kwargs):
        answers = iter(self.texts)
        return [[Sample(ids=[0], text=next(answers), finished=True) for _ in range(n)] for _ in contexts]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sdzero.modeling import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("lab"))


def test_evaluate_reports_answers_with_nothing_to_extract(tokenizer):
    sets = load_problem_sets(gym_data(), "reasoning-gym", 1, 1, 2, 0)
    first, second = sets.held_out
    texts = [f"<answer>{first['answer']}</answer>", "I think it is 7", "<answer>0</answer>", "<answer>"]
    report = evaluate(ScriptedGenerator(tokenizer, texts), sets.held_out, make_verifier("reasoning-gym"), k=2,
                      progress=False)
    assert report["no_answer"] == {"count": 2, "share": 0.5}
    assert report["accuracy"] == 0.25

    lab_texts = ["Answer: 3", "no answer", "Answer: 4", "Answer: 5"]
    lab_rows = [{"id": "a", "problem": "1 + 2", "answer": "3"}, {"id": "b", "problem": "2 + 2", "answer": "4"}]
    report = evaluate(ScriptedGenerator(tokenizer, lab_texts), lab_rows, lab_reward, k=2, progress=False)
    assert report["no_answer"] == {"count": 1, "share": 0.25}

    def own_reward(completion: str, row: dict) -> float:
        return 1.0
    report = evaluate(ScriptedGenerator(tokenizer, lab_texts), lab_rows, own_reward, k=2, progress=False)
    assert report["no_answer"] is None  # a function without an extractor cannot tell
