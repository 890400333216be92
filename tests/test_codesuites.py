"""HumanEval and MBPP problems: loading, building the program from a completion, and the sandboxed checks."""

import importlib.util
import json

import pytest

from sdzero import sandbox
from sdzero.data import DataConfig, load_problems, validate_rows
from sdzero.tasks.code import assemble_program, code_reward, code_row_reward
from sdzero.tasks.code_rows import parse_tests
from sdzero.tasks.codesuites import humaneval_rows

needs_sandbox = pytest.mark.skipif(not sandbox.sandbox_available(), reason="bubblewrap missing")


@pytest.fixture(scope="module")
def humaneval():
    rows = humaneval_rows()
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    problems, _ = validate_rows(rows, columns, DataConfig(), "code", "humaneval")
    return {p["id"]: p for p in problems}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_humaneval_rows_come_from_the_package(humaneval):
    assert len(humaneval) == 164
    first = humaneval["HumanEval/0"]
    assert first["tests"][0]["entry_point"] == "has_close_elements"
    assert first["problem"].startswith(first["prompt"])
    assert first["problem"].endswith("in one ```python code block.")
    assert "`has_close_elements`" in first["problem"]


@pytest.mark.slow
@needs_sandbox
def test_every_canonical_solution_passes_and_every_bare_prompt_fails(humaneval):
    # The whole set takes about 6 s on one core.
    wrong = [i for i, p in humaneval.items() if code_row_reward(p["canonical_solution"], p) != 1.0]
    assert wrong == []
    accepted = [i for i, p in humaneval.items() if code_row_reward("", p) != 0.0]
    assert accepted == []


HAS_CLOSE_BODY = """\
    for i, a in enumerate(numbers):
        for b in numbers[i + 1:]:
            if abs(a - b) < threshold:
                return True
    return False
"""


@needs_sandbox
@pytest.mark.parametrize("completion", [
    HAS_CLOSE_BODY,  # the body, as the prompt continues
    "Here it is:\n```python\n" + HAS_CLOSE_BODY + "```\n",  # the body in a fence
    "```python\n" + HAS_CLOSE_BODY.replace("\n    ", "\n").lstrip() + "```",  # the body written flush left
    # the whole function, with its import, after some prose and an earlier draft
    "Draft:\n```python\ndef f(): pass\n```\nFinal:\n```python\nfrom typing import List\n\n\n"
    "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n" + HAS_CLOSE_BODY + "```",
    # the whole function with a helper, using List from the prompt's imports
    "```python\ndef _close(a, b, t):\n    return abs(a - b) < t\n\n"
    "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    "    return any(_close(a, b, threshold) for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```",
], ids=["body", "fenced-body", "flush-body", "whole-function", "whole-with-helper"])
def test_body_and_whole_function_completions_pass(humaneval, completion):
    assert code_row_reward(completion, humaneval["HumanEval/0"]) == 1.0


def test_the_program_is_prompt_plus_body_or_prompt_plus_function(humaneval):
    test = humaneval["HumanEval/0"]["tests"][0]
    assert assemble_program(HAS_CLOSE_BODY, test) == test["prompt"] + HAS_CLOSE_BODY
    whole = "def has_close_elements(numbers, threshold):\n    return False\n"
    program = assemble_program(f"```python\n{whole}```", test)
    assert program.startswith(test["prompt"].rstrip()) and program.endswith(whole)


@needs_sandbox
def test_a_wrong_body_fails(humaneval):
    assert code_row_reward("    return False\n", humaneval["HumanEval/0"]) == 0.0
    assert code_row_reward("    return len(numbers) > 1\n", humaneval["HumanEval/0"]) == 0.0


@needs_sandbox
@pytest.mark.parametrize("cheat", [
    "import os\nos._exit(0)\n",
    "exit(0)\n",
    "raise SystemExit(0)\n",
    "import sys\nprint('0' * 32)\nsys.stdout.flush()\nsys.exit(0)\n",
    # a guess at the result descriptor: a line of the right shape, but not the token
    "import os\nfor fd in range(3, 10):\n    try:\n        os.write(fd, b'%032x\\n' % 0)\n    except OSError:\n"
    "        pass\nos._exit(0)\n",
], ids=["os._exit", "exit", "SystemExit", "fake-marker", "result-fd"])
def test_a_program_that_exits_before_the_checks_or_fakes_success_fails(humaneval, cheat):
    whole = "```python\n" + cheat + "def has_close_elements(numbers, threshold):\n    return False\n```"
    assert code_row_reward(whole, humaneval["HumanEval/0"]) == 0.0


@needs_sandbox
def test_a_function_that_exits_when_called_fails(humaneval):
    body = "    import os\n    os._exit(0)\n"
    assert code_row_reward(body, humaneval["HumanEval/0"]) == 0.0


MBPP_ROWS = [
    {"task_id": 11, "text": "Write a python function to remove the first and last occurrence of a given character.",
     "code": "def remove_Occ(s, ch):\n    s = s.replace(ch, '', 1)\n    i = s.rfind(ch)\n"
             "    return s if i < 0 else s[:i] + s[i + 1:]\n",
     "test_list": ['assert remove_Occ("hello","l") == "heo"', 'assert remove_Occ("abcda","a") == "bcd"',
                   'assert remove_Occ("PHP","P") == "H"', 'assert remove_Occ("xaxax","x") == "axa"'],
     "test_setup_code": ""},
    {"task_id": 12, "text": "Write a function that gives the area of a Box.",
     "code": "def area(box):\n    return box.w * box.h\n",
     "test_list": ["assert area(Box(2, 3)) == 6", "assert area(Box(5, 1)) == 5"],
     "test_setup_code": "class Box:\n    def __init__(self, w, h):\n        self.w, self.h = w, h\n"},
]


@needs_sandbox
def test_mbpp_rows_pass_with_their_code_and_fail_without_it(tmp_path):
    path = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    problems, _ = load_problems(str(path), DataConfig(), "code")
    assert [p["id"] for p in problems] == ["11", "12"]
    assert problems[0]["problem"].startswith(MBPP_ROWS[0]["text"])
    assert "`remove_Occ`" in problems[0]["problem"] and 'assert remove_Occ("hello","l") == "heo"' in problems[0]["problem"]
    assert "`area`" in problems[1]["problem"]  # Box comes from the setup code: not the tested function
    for problem in problems:
        assert code_row_reward(f"```python\n{problem['code']}```", problem) == 1.0
        assert code_row_reward("", problem) == 0.0
    almost = "def remove_Occ(s, ch):\n    return s.replace(ch, '')\n"  # passes 3 of the 4 asserts
    assert code_row_reward(almost, problems[0]) == 0.0
    slow = "import time\ndef area(box):\n    time.sleep(30)\n    return box.w * box.h\n"
    assert code_reward(slow, problems[1]["tests"], timeout_s=1.0) == 0.0


@needs_sandbox
def test_check_tests_survive_a_json_round_trip(tmp_path):
    path = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS[1:])
    problem = load_problems(str(path), DataConfig(), "code")[0][0]
    tests = json.loads(json.dumps(problem["tests"]))
    assert parse_tests("x", tests, "tests") == problem["tests"]
    assert code_reward(MBPP_ROWS[1]["code"], json.dumps(tests)) == 1.0


@pytest.mark.parametrize("change, message", [
    ({"entry_point": None}, "humaneval.jsonl:2: field 'entry_point' must be a string, got missing"),
    ({"entry_point": "not a name"}, "humaneval.jsonl:2: field 'entry_point' must be a function name"),
    ({"test": "def check(candidate):\n    assert candidate(1) ==\n"}, "humaneval.jsonl:2: field 'test' is not valid Python"),
    ({"prompt": ""}, "humaneval.jsonl:2: field 'prompt' is empty"),
])
def test_humaneval_rows_missing_fields_are_refused(tmp_path, humaneval, change, message):
    good = {k: humaneval["HumanEval/1"][k] for k in ("task_id", "prompt", "test", "entry_point")}
    bad = {k: v for k, v in {**good, "task_id": "HumanEval/x", **change}.items() if v is not None}
    path = write_jsonl(tmp_path / "humaneval.jsonl", [good, bad])
    with pytest.raises(ValueError, match=message):
        load_problems(str(path), DataConfig(), "code")


@pytest.mark.parametrize("change, message", [
    ({"test_list": []}, "field 'test_list' must be a non-empty list of assert lines, got empty"),
    ({"test_list": "assert f(1) == 2"}, "field 'test_list' is a string but not valid JSON"),
    ({"test_list": ["assert f(1) =="]}, "field 'test_list' is not valid Python"),
    ({"text": None}, "field 'text' is missing"),
])
def test_mbpp_rows_missing_fields_are_refused(tmp_path, change, message):
    bad = {k: v for k, v in {**MBPP_ROWS[1], **change}.items() if v is not None}
    path = write_jsonl(tmp_path / "mbpp.jsonl", [MBPP_ROWS[0], bad])
    with pytest.raises(ValueError, match=f"mbpp.jsonl:2: {message}"):
        load_problems(str(path), DataConfig(), "code")


def test_the_users_instruction_replaces_the_default(tmp_path):
    path = write_jsonl(tmp_path / "mbpp.jsonl", MBPP_ROWS)
    problems, _ = load_problems(str(path), DataConfig(instruction="Answer in Python."), "code")
    assert problems[0]["problem"] == MBPP_ROWS[0]["text"] + "\n\nAnswer in Python."


@needs_sandbox
def test_sdzero_check_counts_failures_and_errors(tmp_path, capsys):
    from sdzero.cli import main

    broken = {**MBPP_ROWS[0], "task_id": 13, "code": "def remove_Occ(s, ch):\n    return s\n"}
    no_reference = {**MBPP_ROWS[1], "task_id": 14, "code": ""}
    path = write_jsonl(tmp_path / "mbpp.jsonl", [*MBPP_ROWS, broken, no_reference])
    out = tmp_path / "check"
    argv = ["check", "--data", str(path), "--task", "code", "--solution-field", "code", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 1
    assert "4 rows: 2 passed, 1 failed, 1 errors" in capsys.readouterr().out
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["status"]) for f in failures] == [("13", "failed"), ("14", "error")]
    assert failures[0]["completion"] == broken["code"] and "'code' is missing or empty" in failures[1]["reason"]
    summary = json.loads((out / "check.json").read_text())
    assert (summary["rows"], summary["passed"], summary["failed"], summary["errors"]) == (4, 2, 1, 1)

    assert main([*argv, "--limit", "2"]) == 0  # the two good rows only
    assert "2 rows: 2 passed" in capsys.readouterr().out
    argv[-2] = "none"
    assert main([*argv, "--limit", "2"]) == 1  # an empty response passes no row
    assert "2 rows: 0 passed, 2 failed" in capsys.readouterr().out
    argv[-2] = "answer"
    assert main(argv) == 2  # not a field of the data
    assert "--solution-field 'answer' is not a field" in capsys.readouterr().err


@pytest.mark.slow
@needs_sandbox
def test_sdzero_check_on_the_humaneval_source(capsys):
    from sdzero.cli import main

    argv = ["check", "--data", "humaneval", "--task", "code", "--solution-field", "canonical_solution",
            "--limit", "10", "--quiet"]
    assert main(argv) == 0
    assert "10 rows: 10 passed, 0 failed, 0 errors" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym is not installed")
def test_sdzero_check_on_a_reasoning_gym_source(capsys):
    from sdzero.cli import main

    argv = ["check", "--data", "reasoning-gym:chain_sum", "--task", "reasoning-gym", "--limit", "5", "--quiet"]
    assert main([*argv, "--solution-field", "answer"]) == 0  # written in the answer rule's format
    assert main([*argv, "--solution-field", "none"]) == 1  # the question itself is no answer
    assert "5 rows: 5 passed" in capsys.readouterr().out
