"""Math and code verifiers: correctness, pathological inputs, threads and worker processes."""

import multiprocessing
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sdzero import sandbox, verifiers
from sdzero.verifiers import (
    VERIFIERS,
    code_reward,
    extract_program,
    get_verifier,
    lab_reward,
    last_boxed,
    math_reward,
    normalize_output,
)

needs_sandbox = pytest.mark.skipif(not sandbox.sandbox_available(), reason="bubblewrap missing")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")


def test_registry():
    assert get_verifier("lab") is lab_reward
    assert lab_reward("3+5=8. Answer: 8", {"answer": "8"}) == 1.0
    assert VERIFIERS["math"]("so \\boxed{4}", {"answer": "4"}) == 1.0
    assert get_verifier("math").__name__ == "math_row_reward"
    assert get_verifier("code").__name__ == "code_row_reward"
    with pytest.raises(ValueError):
        get_verifier("nope")


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
    monkeypatch.setattr(verifiers, "_op_timeout", lambda timeout_s: 600)
    math_reward("\\boxed{1}", "1")
    before = verifiers._MATH.proc.pid
    start = time.monotonic()
    assert math_reward("\\boxed{9^{9^{9}}}", "5", timeout_s=1.5) == 0.0
    assert time.monotonic() - start < 3
    assert verifiers._MATH.proc is None  # killed; the next call starts a fresh one
    monkeypatch.undo()
    assert math_reward("\\boxed{2}", "2") == 1.0 and verifiers._MATH.proc.pid != before


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
    assert VERIFIERS["code"](right, {"tests": DOUBLE_TESTS}) == 1.0


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
