"""Problem sets: reading JSONL / JSON / Parquet / dataset folders, validation errors that name the
file, row and field, skipped math rows, the seeded split and its record. Nothing is downloaded: a
dataset folder goes through `datasets.load_dataset` exactly as a hub id would, in offline mode."""

import json

import pytest

from sdzero import lab
from sdzero.data import DataConfig, load_problem_sets, load_problems
from sdzero.splits import split_problems
from sdzero.tasks.code import code_row_reward
from sdzero.tasks.code_rows import CODE_INSTRUCTION
from sdzero.tasks.math import MATH_INSTRUCTION, math_row_reward

RAW = DataConfig(instruction="")  # no instruction appended: problems compare equal to the input text


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def math_rows(n, prefix="q"):
    return [{"id": f"{prefix}{i}", "problem": f"{prefix} problem {i}", "answer": str(i)} for i in range(n)]


@pytest.fixture
def offline_datasets(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return datasets


def test_jsonl_json_parquet_read_the_same(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = math_rows(3)
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    expected = [{"id": r["id"], "problem": r["problem"], "answer": r["answer"]} for r in rows]
    for path in (jsonl, str(tmp_path / "a.json"), str(tmp_path / "a.parquet")):
        problems, skipped = load_problems(path, RAW, "math")
        assert problems == expected, path
        assert skipped["count"] == 0


def test_the_whole_row_reaches_the_verifier(tmp_path):
    tests = [{"input": "3\n", "output": "6\n"}]
    cpp = ("```cpp\n#include <iostream>\nint main() { long a; std::cin >> a; std::cout << 2 * a << std::endl; }\n```")
    rows = [{"id": "c1", "problem": "Double it.", "tests": tests, "language": "C++", "source": "contest 7"},
            {"id": "c2", "problem": "Double it.", "tests": tests}]
    problems, _ = load_problems(write_jsonl(tmp_path / "code.jsonl", rows), DataConfig(), "code")
    assert problems[0]["language"] == "cpp" and problems[0]["source"] == "contest 7"
    assert "```cpp" in problems[0]["problem"] and "```python" in problems[1]["problem"]
    assert "language" not in problems[1]  # the verifier's default, python
    # a correct C++ program passes on the loaded row, as on the raw one
    assert code_row_reward(cpp, problems[0]) == code_row_reward(cpp, rows[0] | {"language": "cpp"}) == 1.0

    bad = write_jsonl(tmp_path / "bad.jsonl", [{**rows[1], "language": "cobol"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'language': unsupported language 'cobol'"):
        load_problems(bad, DataConfig(), "code")


def test_a_custom_reward_function_needs_no_answer_column(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"Say {i}.", "expected": str(i)} for i in range(3)]
    problems, skipped = load_problems(write_jsonl(tmp_path / "own.jsonl", rows), RAW, "tiny:even_length")
    assert [p["expected"] for p in problems] == ["0", "1", "2"] and skipped["count"] == 0
    assert all("answer" not in p for p in problems)
    with pytest.raises(ValueError, match="no 'answer' or 'solution' column"):
        load_problems(str(tmp_path / "own.jsonl"), RAW, "math")  # the built-in math verifier needs one


def test_default_instructions_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "What is 2+2?", "answer": 4},
                                              {"question": "1+1?", "answer": "2"}])
    problems, _ = load_problems(path, DataConfig(), "math")
    # the row's own columns stay; id, problem (with the instruction) and the parsed answer are set
    assert problems[0] == {"question": "What is 2+2?", "id": "1", "problem": "What is 2+2?\n\n" + MATH_INSTRUCTION,
                           "answer": "4"}
    assert problems[1]["id"] == "2"  # no id column: the row's position
    code = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Echo.", "tests": [{"input": "a\n", "output": "a\n"}]}])
    assert load_problems(code, DataConfig(), "code")[0][0]["problem"] == "Echo.\n\n" + CODE_INSTRUCTION
    custom = load_problems(path, DataConfig(instruction="Be brief."), "math")[0]
    assert custom[0]["problem"] == "What is 2+2?\n\nBe brief."


def test_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"uid": "a", "text": "P1", "final": "7/2", "answer": "wrong column"}])
    cfg = DataConfig(problem_field="text", answer_field="final", id_field="uid", instruction="")
    (problem,) = load_problems(path, cfg, "math")[0]
    # the mapped columns fill the roles; the row's own "answer" column gives way to the mapped one
    assert problem == {"uid": "a", "text": "P1", "final": "7/2", "id": "a", "problem": "P1", "answer": "7/2"}
    code = write_jsonl(tmp_path / "c.jsonl", [{"id": 5, "problem": "P", "cases": [{"input": "1", "output": "1"}]}])
    cfg = DataConfig(tests_field="cases", instruction="")
    tests = [{"input": "1", "output": "1"}]
    assert load_problems(code, cfg, "code")[0] == [{"id": "5", "problem": "P", "cases": tests, "tests": tests}]


def test_mapped_field_absent_names_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", math_rows(2))
    with pytest.raises(ValueError) as err:
        load_problems(path, DataConfig(answer_field="gold"), "math")
    assert "answer_field 'gold' is not a column" in str(err.value) and "['id', 'problem', 'answer']" in str(err.value)
    bare = write_jsonl(tmp_path / "b.jsonl", [{"text": "P", "answer": "1"}])
    with pytest.raises(ValueError, match=r"no 'problem' or 'question' or 'prompt' column .*\['text', 'answer'\]"):
        load_problems(bare, DataConfig(), "math")
    with pytest.raises(ValueError, match=r"no 'tests' column"):
        load_problems(path, DataConfig(), "code")


def test_boxed_answer_from_solution_keeps_nested_braces(tmp_path):
    rows = [
        {"problem": "A", "solution": "First \\boxed{1}, then \\boxed{\\frac{1}{2}}."},
        {"problem": "B", "solution": "So it is $\\boxed{ \\sqrt{x^{2}+1} }$"},
    ]
    problems, _ = load_problems(write_jsonl(tmp_path / "s.jsonl", rows), RAW, "math")
    assert [p["answer"] for p in problems] == ["\\frac{1}{2}", "\\sqrt{x^{2}+1}"]
    # An answer column holding a box gives the box's content too.
    boxed = write_jsonl(tmp_path / "a.jsonl", [{"problem": "C", "answer": "\\boxed{\\{1,2\\}}"}])
    assert load_problems(boxed, RAW, "math")[0][0]["answer"] == "\\{1,2\\}"


def test_unparsable_math_rows_are_skipped_and_counted(tmp_path):
    rows = [
        {"problem": "ok", "answer": "1"},
        {"problem": "no answer, boxed solution", "answer": "", "solution": "thus \\boxed{5}"},
        {"problem": "no answer, no box", "answer": None, "solution": "it is five"},
        {"problem": "cut-off box", "answer": "", "solution": "thus \\boxed{5"},
        {"problem": "nothing at all", "solution": "five"},
        {"problem": "NaN answer", "answer": float("nan"), "solution": "five"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    problems, skipped = load_problems(path, RAW, "math")
    assert [(p["id"], p["answer"]) for p in problems] == [("1", "1"), ("2", "5")]
    assert skipped == {
        "count": 4,
        "reasons": {"no complete \\boxed{...} in 'solution'": 4},
        "rows": [f"{path}:3", f"{path}:4", f"{path}:5", f"{path}:6"],
    }
    only_answer = write_jsonl(tmp_path / "o.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": " "}])
    problems, skipped = load_problems(only_answer, RAW, "math")
    assert len(problems) == 1 and skipped["reasons"] == {"no 'answer'": 1} and skipped["rows"] == [f"{only_answer}:2"]


@pytest.mark.parametrize(
    "bad_row, field_message",
    [
        ({"id": "x", "answer": "1"}, "field 'problem' is missing"),
        ({"id": "x", "problem": "   ", "answer": "1"}, "field 'problem' is empty"),
        ({"id": "x", "problem": ["a"], "answer": "1"},
         "field problem[0] must be a message {{'role', 'content'}}, got str"),
        ({"id": "x", "problem": 7, "answer": "1"}, "field 'problem' must be a string, got int"),
        ({"id": "x", "problem": [], "answer": "1"}, "field 'problem' is empty"),
        ({"id": "x", "problem": [{"role": "user"}], "answer": "1"},
         "field problem[0].content must be a string, got missing"),
        ({"id": "x", "problem": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
          "answer": "1"}, "field 'problem': the last message must be the user's, got 'assistant'"),
        ({"id": "x", "problem": "p", "answer": [1]}, "field 'answer' must be a string or a number, got list"),
        ({"id": None, "problem": "p", "answer": "1"}, "field 'id' must be a string or an integer, got missing"),
        ({"id": 1.5, "problem": "p", "answer": "1"}, "field 'id' must be a string or an integer, got a float"),
        ({"id": "q0", "problem": "p", "answer": "1"}, "field 'id': duplicate id 'q0' (first at {path}:1)"),
    ],
)
def test_malformed_math_row_names_file_line_and_field(tmp_path, bad_row, field_message):
    path = write_jsonl(tmp_path / "m.jsonl", [*math_rows(2), "", bad_row])  # line 3 is blank: bad row is line 4
    with pytest.raises(ValueError) as err:
        load_problems(path, RAW, "math")
    assert str(err.value) == f"{path}:4: " + field_message.format(path=path)


def test_bad_json_line_and_wrong_shapes(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [*math_rows(1), '{"problem": "p", "answer": '])
    with pytest.raises(ValueError, match=rf"^{path}:2: not valid JSON"):
        load_problems(path, RAW, "math")
    path = write_jsonl(tmp_path / "l.jsonl", [*math_rows(1), "[1, 2]"])
    with pytest.raises(ValueError, match=rf"^{path}:2: expected a JSON object, got list"):
        load_problems(path, RAW, "math")
    (tmp_path / "d.json").write_text(json.dumps({"data": math_rows(1)}))
    with pytest.raises(ValueError, match="expected a JSON list of objects, got dict"):
        load_problems(str(tmp_path / "d.json"), RAW, "math")
    (tmp_path / "r.json").write_text(json.dumps([*math_rows(2), {"id": "z", "problem": 3, "answer": "1"}]))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'r.json'} row 3: field 'problem' must be a string"):
        load_problems(str(tmp_path / "r.json"), RAW, "math")


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.jsonl"):
        load_problems(str(tmp_path / "nope.jsonl"), RAW, "math")
    (tmp_path / "x.csv").write_text("problem,answer\n")
    with pytest.raises(ValueError, match=r"x.csv: unsupported file type '.csv'; use one of .jsonl, .json, .parquet"):
        load_problems(str(tmp_path / "x.csv"), RAW, "math")


def test_code_tests_as_list_json_string_and_columns(tmp_path):
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2\n", "output": "4\n"}]
    rows = [
        {"id": "list", "problem": "Add.", "tests": tests},
        {"id": "string", "problem": "Add.", "tests": json.dumps(tests)},
        {"id": "columns", "problem": "Add.", "tests": {"input": ["1 2\n", "2 2\n"], "output": ["3\n", "4\n"]}},
    ]
    problems, _ = load_problems(write_jsonl(tmp_path / "c.jsonl", rows), RAW, "code")
    assert [p["tests"] for p in problems] == [tests, tests, tests]


@pytest.mark.parametrize(
    "tests, message",
    [
        (None, "field 'tests' is missing"),
        ([], "field 'tests' is empty"),
        ("[{", "field 'tests' is a string but not valid JSON"),
        ({"input": ["1"], "output": []}, "field 'tests': expected {'input': [...], 'output': [...]} lists of equal length"),
        (7, "field 'tests' must be a list of tests, got int"),
        (["1"], "field tests[0] must be an object with 'input' and 'output'"),
        ([{"input": "1", "output": "1"}, {"input": "1"}], "field tests[1].output must be a string, got missing"),
        ([{"input": 1, "output": "1"}], "field tests[0].input must be a string, got int"),
    ],
)
def test_malformed_code_tests(tmp_path, tests, message):
    good = {"id": "a", "problem": "P", "tests": [{"input": "", "output": "x"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [good, {"id": "b", "problem": "P", "tests": tests}])
    with pytest.raises(ValueError) as err:
        load_problems(path, RAW, "code")
    assert str(err.value).startswith(f"{path}:2: {message}")


def test_split_is_disjoint_deterministic_and_seeded():
    pool = math_rows(50)
    sets = split_problems(pool, 20, 15, 10, seed=1)
    n1, n2, held = sets.n1, sets.n2, sets.held_out
    ids = [p["id"] for p in n1 + n2 + held]
    assert (len(n1), len(n2), len(held), len(sets.validation)) == (20, 15, 10, 0) and len(set(ids)) == 45
    assert split_problems(pool, 20, 15, 10, seed=1) == sets
    other_seed = split_problems(pool, 20, 15, 10, seed=2)
    assert [p["id"] for p in other_seed.n1] != [p["id"] for p in n1]
    assert other_seed.held_out == held  # the held-out set does not move with the run seed
    with pytest.raises(ValueError, match=r"the problem pool has 50 problems; requested n_phase1=30 \+ n_phase2=15 \+ "
                                         r"n_validation=0 \+ n_eval=10 = 55"):
        split_problems(pool, 30, 15, 10, seed=1)


def test_load_problem_sets_records_the_split(tmp_path):
    rows = math_rows(30) + [{"id": "bad", "problem": "x", "solution": "no box"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    sets = load_problem_sets(DataConfig(path=path), "math", 10, 12, 5, seed=3, record_dir=tmp_path / "run")
    record = json.loads((tmp_path / "run" / "split.json").read_text())
    assert record["source"] == {"path": path, "name": None, "split": "train"}
    assert record["seed"] == 3 and "shuffled" in record["rule"]
    assert record["n_phase1"] == [p["id"] for p in sets.n1] and len(record["n_phase1"]) == 10
    assert record["n_phase2"] == [p["id"] for p in sets.n2] and len(record["n_phase2"]) == 12
    assert record["held_out"] == [p["id"] for p in sets.held_out] and len(record["held_out"]) == 5
    assert record["skipped"]["train"]["count"] == 1 and record["skipped"]["train"]["rows"] == [f"{path}:31"]
    assert len(set(record["n_phase1"]) | set(record["n_phase2"]) | set(record["held_out"])) == 27


def test_eval_file_gives_the_held_out_set_and_leaks_are_removed(tmp_path):
    train = math_rows(20, "t") + [{"id": "copy", "problem": "e problem 0", "answer": "0"}]
    evals = math_rows(8, "e")
    data = DataConfig(path=write_jsonl(tmp_path / "t.jsonl", train), eval_path=write_jsonl(tmp_path / "e.jsonl", evals))
    sets = load_problem_sets(data, "math", 12, 8, 8, seed=0)
    assert {p["id"] for p in sets.held_out} == {r["id"] for r in evals}
    assert {p["id"] for p in sets.n1 + sets.n2} == {r["id"] for r in math_rows(20, "t")}  # "copy" left out
    assert sets.skipped["train"]["reasons"] == {"same text as an evaluation problem": 1}
    with pytest.raises(ValueError, match=r"the evaluation set has 8 problems; requested n_eval=9"):
        load_problem_sets(data, "math", 12, 8, 9, seed=0)
    with pytest.raises(ValueError, match="data.eval_split needs data.eval_path"):
        load_problem_sets(DataConfig(path=data.path, eval_split="test"), "math", 1, 1, 1, seed=0)


def test_dataset_folder_through_load_dataset(tmp_path, offline_datasets):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", math_rows(12, "t"))
    write_jsonl(folder / "test.jsonl", math_rows(4, "e"))
    problems, _ = load_problems(str(folder), RAW, "math", split="test")
    assert [p["id"] for p in problems] == ["e0", "e1", "e2", "e3"]
    data = DataConfig(path=str(folder), eval_split="test")  # held-out set = the folder's test split
    sets = load_problem_sets(data, "math", 6, 6, 4, seed=0)
    assert {p["id"] for p in sets.held_out} == {"e0", "e1", "e2", "e3"}
    assert len({p["id"] for p in sets.n1 + sets.n2}) == 12
    with pytest.raises(ValueError, match=r"could not load dataset .*my_dataset \[validation\]"):
        load_problems(str(folder), RAW, "math", split="validation")


def test_lab_delegates_to_the_builtin_task():
    sets = load_problem_sets(DataConfig(), "lab", 5, 6, 4, seed=7)
    assert (sets.n1, sets.n2, sets.held_out) == lab.problem_sets(5, 6, 4, 7)
    with pytest.raises(ValueError, match="data.path is required for task 'math'"):
        load_problem_sets(DataConfig(), "math", 5, 6, 4, seed=7)
    with pytest.raises(ValueError, match=r"unknown task 'maths'; choose one of \['code', 'lab', 'math', 'reasoning-gym'\]"):
        load_problem_sets(DataConfig(), "maths", 5, 6, 4, seed=7)


def test_math_verifier_accepts_a_loaded_row(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "h", "problem": "Half?", "solution": "It is \\boxed{\\frac{1}{2}}."}])
    sets = load_problem_sets(DataConfig(path=path), "math", 1, 0, 0, seed=0)
    row = sets.n1[0]
    assert math_row_reward("So the answer is \\boxed{0.5}", row) == 1.0
    assert math_row_reward("So the answer is \\boxed{\\frac{1}{3}}", row) == 0.0


DATA = __import__("pathlib").Path(__file__).parent / "data"
APPS = DataConfig(path=str(DATA / "apps_call.jsonl"), problem_field="question", tests_field="input_output",
                  id_field="problem_id")
LCB = DataConfig(path=str(DATA / "livecodebench_functional.jsonl"), problem_field="question_content",
                 tests_field="public_test_cases", id_field="question_id")


def test_apps_input_output_becomes_call_tests():
    problems, _ = load_problems(APPS.path, APPS, "code")
    by_id = {p["id"]: p for p in problems}
    assert by_id["4001"]["tests"][0] == {"fn_name": "count_vowels", "args": ["hello"], "expected": [2], "unwrap": True}
    assert by_id["4003"]["tests"][1]["args"] == [[7]]
    assert "`count_vowels`" in by_id["4001"]["problem"] and "def count_vowels(s):" in by_id["4001"]["problem"]
    # Without fn_name the same column style is stdin/stdout.
    assert by_id["4004"]["tests"] == [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -3\n", "output": "7\n"}]
    assert by_id["4004"]["problem"].endswith(CODE_INSTRUCTION)


def test_livecodebench_functional_tests_become_call_tests():
    problems, _ = load_problems(LCB.path, LCB, "code")
    by_id = {p["id"]: p for p in problems}
    assert by_id["lcb-1"]["tests"][0] == {"fn_name": "pairWithTarget", "args": [[2, 7, 11, 15], 9], "expected": [0, 1]}
    assert by_id["lcb-2"]["tests"][1] == {"fn_name": "halfTotal", "args": [[]], "expected": 0.0}
    assert "class Solution:" in by_id["lcb-1"]["problem"]
    assert by_id["lcb-3"]["tests"] == [{"input": "abc\n", "output": "ABC\n"}]  # a stdin test stays one


@pytest.mark.parametrize(
    "row, message",
    [
        ({"tests": {"fn_name": "f", "inputs": [1], "outputs": [1]}}, "field tests.inputs[0] must be a list of arguments, got int"),
        ({"tests": {"fn_name": "not a name", "inputs": [[1]], "outputs": [1]}}, "field tests.fn_name must be a function name, got 'not a name'"),
        ({"tests": [{"input": "1", "output": "1", "testtype": "functional"}]},
         "field tests[0] is a functional test, but the row has no metadata.func_name"),
        ({"tests": [{"input": "1", "output": "1", "testtype": "functional"}], "metadata": "{"},
         "field 'metadata' is a string but not valid JSON"),
        ({"tests": [{"input": "[1]\nnope", "output": "1", "testtype": "functional"}], "metadata": {"func_name": "f"}},
         "field tests[0].input line 2: not valid JSON"),
        ({"tests": [{"input": "1", "output": "{", "testtype": "functional"}], "metadata": {"func_name": "f"}},
         "field tests[0].output: not valid JSON"),
        ({"tests": [{"fn_name": "f", "args": 1, "expected": 1}]}, "field tests[0]: a call test needs 'args' (a list) and 'expected'"),
        ({"tests": {"fn_name": "f", "inputs": [[1]], "outputs": [1]}, "language": "cpp"},
         "field 'language': call tests need Python, got 'cpp'"),
    ],
)
def test_malformed_call_tests(tmp_path, row, message):
    good = {"id": "a", "problem": "P", "tests": [{"input": "", "output": "x"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [good, {"id": "b", "problem": "P", **row}])
    with pytest.raises(ValueError) as err:
        load_problems(path, RAW, "code")
    assert str(err.value).startswith(f"{path}:2: {message}")


def test_call_tests_survive_a_round_trip_through_jsonl(tmp_path):
    problems, _ = load_problems(APPS.path, APPS, "code")
    again, _ = load_problems(write_jsonl(tmp_path / "again.jsonl", problems), RAW, "code")
    assert [p["tests"] for p in again] == [p["tests"] for p in problems]
