"""Math and code verifiers: correctness, pathological inputs, threads and worker processes."""

import multiprocessing
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sdzero import sandbox
from sdzero.data import DataConfig, load_problems
from sdzero.tasks import REWARD_FUNCTIONS, reward_function
from sdzero.tasks import math as math_task
from sdzero.tasks.code import code_reward, code_row_reward, extract_program, normalize_output, same_value
from sdzero.tasks.lab import lab_reward
from sdzero.tasks.math import last_boxed, math_reward

needs_sandbox = pytest.mark.skipif(not sandbox.sandbox_available(), reason="bubblewrap missing")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")


def test_registry():
    assert reward_function("lab") is lab_reward
    assert lab_reward("3+5=8. Answer: 8", {"answer": "8"}) == 1.0
    assert REWARD_FUNCTIONS["math"]("so \\boxed{4}", {"answer": "4"}) == 1.0
    assert reward_function("math").__name__ == "math_row_reward"
    assert reward_function("code").__name__ == "code_row_reward"
    with pytest.raises(ValueError):
        reward_function("nope")


# ---- math ---------------------------------------------------------------------------------


def test_last_boxed():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{\\sqrt{2}}} c") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed {\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("no box here") is None
    assert last_boxed("cut off \\boxed{\\frac{1}{2") is None


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("\\frac{3}{4}", "3/4"),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
        ("x + 1", "\\boxed{1 + x}"),
    ],
)
def test_math_equivalent_forms(pred, gold):
    assert math_reward(f"Thus the answer is \\boxed{{{pred}}}.", gold) == 1.0


def test_math_wrong_and_missing():
    assert math_reward("\\boxed{3}", "4") == 0.0
    assert math_reward("The answer is 4.", "4") == 0.0  # no box
    assert math_reward("\\boxed{}", "4") == 0.0


def test_math_last_box_wins():
    assert math_reward("first \\boxed{4}, corrected: \\boxed{5}", "5") == 1.0
    assert math_reward("first \\boxed{5}, corrected: \\boxed{4}", "5") == 0.0


@pytest.mark.parametrize(
    "pred",
    [
        "{" * 5000 + "1" + "}" * 5000,  # deep nesting
        "\\frac{" * 300 + "1" + "}{2}" * 300,
        "1" * 10**6,  # a million digits
        "9^9^9^9",
        "9^{9^{9^{9}}}",
        "10^{10^{10}} - 10^{10^{10}} + 5",
        "(10^{100000})!",
    ],
)
def test_math_pathological_inputs_are_quick_zeros(pred):
    start = time.monotonic()
    assert math_reward(f"\\boxed{{{pred}}}", "5", timeout_s=3) == 0.0
    assert time.monotonic() - start < 8  # the hard deadline plus a worker restart


def test_math_hard_deadline_kills_a_stuck_worker(monkeypatch):
    # With the worker's own timeouts out of reach, only the parent's deadline can stop it.
    monkeypatch.setattr(math_task, "_op_timeout", lambda timeout_s: 600)
    math_reward("\\boxed{1}", "1")
    before = math_task._MATH.proc.pid
    start = time.monotonic()
    assert math_reward("\\boxed{9^{9^{9}}}", "5", timeout_s=1.5) == 0.0
    assert time.monotonic() - start < 3
    assert math_task._MATH.proc is None  # killed; the next call starts a fresh one
    monkeypatch.undo()
    assert math_reward("\\boxed{2}", "2") == 1.0 and math_task._MATH.proc.pid != before


def test_math_off_the_main_thread():
    completions = ["\\boxed{0.5}", "\\boxed{2}", "\\boxed{1/2}"]
    with ThreadPoolExecutor(max_workers=3) as pool:
        assert list(pool.map(math_reward, completions, ["1/2"] * 3)) == [1.0, 0.0, 1.0]
    box = {}
    hard = "\\boxed{9^{9^{9^{9}}}}"
    t = threading.Thread(target=lambda: box.update(r=math_reward(hard, "1", timeout_s=2)))
    t.start()
    t.join(timeout=10)
    assert box == {"r": 0.0}


def _math_job(args):
    return math_reward(*args)


@pytest.mark.slow
def test_math_in_multiprocessing_workers():
    math_reward("\\boxed{1}", "1")  # the parent's own worker exists before the fork
    jobs = [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{3}", "4"), ("\\boxed{9^{9^{9^{9}}}}", "1")]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_math_job, jobs) == [1.0, 0.0, 0.0]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.map(_math_job, jobs[:2]) == [1.0, 0.0]


# ---- code ---------------------------------------------------------------------------------

DOUBLE_TESTS = [{"input": "3\n", "output": "6\n"}, {"input": "21\n", "output": "42"}]


def test_extract_program_and_normalize():
    text = "idea\n```python\nprint(1)\n```\nfixed:\n```py\nprint(2)\n```\nbye"
    assert extract_program(text) == "print(2)\n"
    assert extract_program("print(3)") == "print(3)"
    assert normalize_output("a  \nb\t\n\n\n") == normalize_output("a\nb") == "a\nb"


@needs_sandbox
def test_code_right_and_wrong():
    right = "```python\nprint(int(input()) * 2)\n```"
    wrong = "```python\nprint(int(input()) + 2)\n```"
    assert code_reward(right, DOUBLE_TESTS) == 1.0
    assert code_reward(wrong, DOUBLE_TESTS) == 0.0
    assert code_reward("```python\nraise SystemExit(1)\n```", DOUBLE_TESTS) == 0.0
    assert code_reward("```python\nprint(int(input()) * 2\n```", DOUBLE_TESTS) == 0.0  # syntax
    assert REWARD_FUNCTIONS["code"](right, {"tests": DOUBLE_TESTS}) == 1.0


@needs_sandbox
def test_code_trailing_whitespace_tolerated():
    src = "```python\nprint('a  ')\nprint('b\\t')\nprint()\nprint()\n```"
    assert code_reward(src, [{"input": "", "output": "a\nb"}]) == 1.0
    assert code_reward(src, [{"input": "", "output": " a\nb"}]) == 0.0  # leading space counts


@needs_sandbox
def test_code_last_block_chosen():
    text = "```python\nprint(0)\n```\nBetter:\n```python\nprint(int(input()) * 2)\n```"
    assert code_reward(text, DOUBLE_TESTS) == 1.0
    assert code_reward(text + "\n```python\nprint(0)\n```", DOUBLE_TESTS) == 0.0


@needs_sandbox
def test_code_per_test_timeout():
    program = "```python\nimport time\nn = int(input())\ntime.sleep({} if n == 21 else 0)\n"
    program += "print(2 * n)\n```"
    start = time.monotonic()
    assert code_reward(program.format(10), DOUBLE_TESTS, timeout_s=1.0) == 0.0
    assert time.monotonic() - start < 4
    assert code_reward(program.format(0.2), DOUBLE_TESTS, timeout_s=1.0) == 1.0


@needs_sandbox
@needs_gxx
def test_code_cpp():
    head = "```cpp\n#include <iostream>\nint main() { long a; std::cin >> a; std::cout << "
    right = head + '2 * a << "\\n"; }\n```'
    wrong = head + 'a << "\\n"; }\n```'
    broken = "```cpp\nint main( {\n```"
    assert code_reward(right, DOUBLE_TESTS, language="cpp") == 1.0
    assert code_reward(wrong, DOUBLE_TESTS, language="cpp") == 0.0
    assert code_reward(broken, DOUBLE_TESTS, language="cpp") == 0.0


# ------------------------------------------------------------------------------------------
# Call tests (APPS/TACO input_output, LiveCodeBench functional)

FIXTURES = Path(__file__).parent / "data"
# Right and wrong solutions of the fixture problems, by problem id.
SOLUTIONS = {
    "4001": ("def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)",
             "def count_vowels(s):\n    return len(s)"),
    "4002": ("def mean(xs):\n    return sum(xs) / len(xs)",
             "def mean(xs):\n    return sum(xs) // len(xs)"),
    "4003": ("def min_max(xs):\n    return min(xs), max(xs)",  # a tuple against a list: the same
             "def min_max(xs):\n    return max(xs), min(xs)"),
    "4004": ("a, b = map(int, input().split())\nprint(a + b)", "print(0)"),
    "lcb-1": ("class Solution:\n    def pairWithTarget(self, nums: List[int], target: int) -> List[int]:\n"
              "        seen = {}\n        for j, x in enumerate(nums):\n            if target - x in seen:\n"
              "                return [seen[target - x], j]\n            seen[x] = j",
              "class Solution:\n    def pairWithTarget(self, nums, target):\n        return [0, 1]"),
    "lcb-2": ("class Solution:\n    def halfTotal(self, nums):\n        return sum(nums) / 2 + 1e-9",
              "class Solution:\n    def halfTotal(self, nums):\n        return sum(nums) / 2 + 1e-3"),
    "lcb-3": ("print(input().upper())", "print(input())"),
}


@needs_sandbox
@pytest.mark.parametrize("fixture, config", [
    ("apps_call.jsonl", dict(problem_field="question", tests_field="input_output", id_field="problem_id")),
    ("livecodebench_functional.jsonl",
     dict(problem_field="question_content", tests_field="public_test_cases", id_field="question_id")),
])
def test_fixture_problems_right_and_wrong(fixture, config):
    problems, _ = load_problems(str(FIXTURES / fixture), DataConfig(**config), "code")
    assert problems
    for problem in problems:
        right, wrong = SOLUTIONS[problem["id"]]
        assert code_row_reward(f"```python\n{right}\n```", problem) == 1.0, problem["id"]
        assert code_row_reward(f"```python\n{wrong}\n```", problem) == 0.0, problem["id"]


@pytest.mark.parametrize("got, expected, same", [
    ([1, 3], [1, 3], True), ((1, 3), [1, 3], True), ([1, [2, (3,)]], [1, [2, [3]]], True),
    (0.1 + 0.2, 0.3, True), (1e9 + 1e-4, 1e9, True), (0.3001, 0.3, False), (2, 2.0, True),
    (10**20, 10**20 + 1, False), ({"a": 1.0}, {"a": 1}, True), ({"a": 1}, {"b": 1}, False),
    ([1], 1, False), ("1", 1, False), (None, None, True), (float("nan"), float("nan"), False),
])
def test_same_value(got, expected, same):
    assert same_value(got, expected) is same


APPS_ADD = {"fn_name": "add", "inputs": [[1, 2], [5, -5]], "outputs": [[3], [0]]}


@needs_sandbox
def test_call_tests_in_apps_form_directly():
    assert code_reward("```python\ndef add(a, b):\n    return a + b\n```", APPS_ADD) == 1.0
    assert code_reward("```python\ndef add(a, b):\n    return [a + b]\n```", APPS_ADD) == 1.0  # as written
    assert code_reward("```python\ndef add(a, b):\n    return a - b\n```", APPS_ADD) == 0.0
    assert code_reward("```python\ndef plus(a, b):\n    return a + b\n```", APPS_ADD) == 0.0  # no such function
    # prints are the program's own business, not the result
    assert code_reward("```python\ndef add(a, b):\n    print(a + b)\n    return a + b\n```", APPS_ADD) == 1.0


@needs_sandbox
@pytest.mark.parametrize("attack", [
    # output that looks like a result, on every channel the program can reach
    "import os, sys\nfor fd in range(1, 10):\n    try:\n        os.write(fd, b'x 3\\n')\n    except OSError:\n"
    "        pass\ndef add(a, b):\n    return 0",
    # end the run at import, before the harness reports anything
    "import os\nprint(3)\nos._exit(0)",
    # a value that equals anything (compared as JSON outside, it is not JSON at all)
    "class Any:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Any()",
    # take over the harness's reporting: it still has to know the answer
    "import json\njson.dumps = lambda v: '3'\ndef add(a, b):\n    return 0",
    # return the expected value if it can be found anywhere: it never enters the sandbox
    "import os, re, sys\ndef add(a, b):\n    for value in list(vars(sys.modules['__main__']).values()):\n"
    "        if isinstance(value, dict) and 'expected' in value:\n            return value['expected']\n"
    "    text = open('/proc/self/fd/0').read() + ' '.join(open(f).read() for f in os.listdir('.'))\n"
    "    found = re.search(r'\"(?:expected|outputs)\": \\[*(-?\\d+)', text)\n"
    "    return int(found.group(1)) if found else None",
])
def test_call_results_cannot_be_forged(attack):
    assert code_reward(f"```python\n{attack}\n```", APPS_ADD) == 0.0
