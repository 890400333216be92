"""The code task: the program in a response, run in the sandbox against the problem's tests.

The program is the last fenced code block of the response (or all of it). Each test runs in its own sandbox: stdin
tests feed the input and compare the output, call tests call a function (or a `class Solution` method) and compare
its return value, check tests (HumanEval's check function, MBPP's asserts) run in the program's own process. The
tests' forms are read by sdzero.tasks.code_rows.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import secrets
import shutil
import textwrap
from concurrent.futures import ThreadPoolExecutor

from sdzero import sandbox
from sdzero.errors import Refusal
from sdzero.tasks.code_rows import code_language, is_call_test, is_check_test, parse_tests

_FENCE_RE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
CPP_COMPILE = "g++ -std=c++17 -O2 -pipe -o main main.cpp 1>&2 && cat main"


def extract_program(completion: str) -> str:
    """The last fenced code block (```python, ```py, ```cpp, ``` ...), or the whole text."""
    blocks = _FENCE_RE.findall(completion)
    return blocks[-1][1] if blocks else completion


def normalize_output(text: str) -> str:
    """Output with trailing whitespace removed from every line and from the end."""
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


# The harness of call tests. It runs inside the sandbox, next to the program (main.py), which is as
# untrusted as ever: it may read the harness's memory and write anything anywhere it can. So the
# expected value never enters the sandbox (the parent compares), and a result counts only as one
# line "<token> <JSON value>" on stdout, the program's own prints going to stderr: stray or
# printed output is never taken for a result. A program that forges the line gains nothing it
# could not get by returning that value.
CALL_HARNESS = """\
import json, os, sys
spec = json.loads(sys.stdin.read())
result_fd = os.dup(1)
os.dup2(2, 1)
# What the benchmarks' solutions may use without importing it (APPS/TACO and LiveCodeBench
# run them after imports like these).
namespace = {"__name__": "solution"}
exec("import bisect, collections, functools, heapq, itertools, math, random, re, string, sys\\n"
     "from collections import *\\nfrom functools import *\\nfrom heapq import *\\n"
     "from itertools import *\\nfrom math import *\\nfrom typing import *\\n", namespace)
with open("main.py", encoding="utf-8") as f:
    exec(compile(f.read(), "main.py", "exec"), namespace)
name = spec["fn_name"]
solution = namespace.get("Solution")
if isinstance(solution, type) and hasattr(solution, name):
    function = getattr(solution(), name)
else:
    function = namespace[name]
value = json.dumps(function(*spec["args"]))
os.write(result_fd, (spec["token"] + " " + value + "\\n").encode())
os._exit(0)
"""
# The harness of check tests (HumanEval's check(candidate), MBPP's asserts): the checks need the
# program's functions, so they run in its process, where the program may do anything the harness can.
# Success is therefore one line holding a random token, written to a duplicate of stdout only after the
# checks returned: the program's prints go to stderr, and exiting early (exit(0), os._exit(0), SystemExit
# from inside the function) ends the process before the token is written. What this cannot stop is a
# program that attacks the harness on purpose from inside (reads the token from its memory, patches the
# modules the checks use, returns objects equal to everything): call tests, compared outside, can.
CHECK_HARNESS = """\
import json, os, sys
spec = json.loads(sys.stdin.read())
result_fd = os.dup(1)
os.dup2(2, 1)
namespace = {"__name__": "solution"}
def run(code, filename):
    exec(compile(code, filename, "exec", optimize=0), namespace)  # optimize=0: asserts are never stripped
run(spec["setup"], "setup.py")
with open("main.py", encoding="utf-8") as f:
    run(f.read(), "main.py")
run(spec["check"], "check.py")
if spec["entry_point"] is not None:
    namespace["check"](namespace[spec["entry_point"]])
os.write(result_fd, (spec["token"] + "\\n").encode())
os._exit(0)
"""
FLOAT_TOLERANCE = 1e-6
"""Return values: floats equal within this, relative or absolute; ints, strings and the rest exactly."""


def same_value(got, expected) -> bool:
    """Equal as return values: tuples and lists alike (JSON has only lists), floats within
    FLOAT_TOLERANCE, containers element by element, everything else by ==."""
    if isinstance(got, float) or isinstance(expected, float):
        if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
            return math.isclose(got, expected, rel_tol=FLOAT_TOLERANCE, abs_tol=FLOAT_TOLERANCE)
        return False
    if isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(got) == len(expected) and all(same_value(g, e) for g, e in zip(got, expected))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(same_value(got[k], expected[k]) for k in got)
    if isinstance(got, (list, tuple, dict)) or isinstance(expected, (list, tuple, dict)):
        return False  # a container against a scalar, or a list against a dict
    return got == expected  # True == 1 as in the benchmarks' own checks


def code_reward(
    completion: str,
    tests,
    *,
    language: str = "python",
    timeout_s: float = 5.0,
    allow_unsafe: bool = False,
    max_workers: int | None = None,
) -> float:
    """1.0 iff the program passes every test.

    `tests` is any form `parse_tests` reads: stdin tests [{"input", "output"}, ...]
    (stdin = input, stdout == output after trimming trailing whitespace per line and at the end),
    call tests [{"fn_name", "args", "expected"}, ...] (the function, or that method of
    `class Solution`, called with args inside the sandbox; its return value compared with
    `same_value`), APPS/TACO's {"fn_name", "inputs", "outputs"}, or check tests
    [{"check", "entry_point", "prompt", "setup"}] (HumanEval's check function, MBPP's asserts; the program
    is built by `assemble_program`). Each test runs in its own
    sandbox with a `timeout_s` wall-time limit. `language` is "python" or "cpp" (needs g++; stdin
    tests only). Without bubblewrap this raises SandboxUnavailable unless `allow_unsafe`.
    """
    language = code_language(language)
    if not sandbox.sandbox_available() and not allow_unsafe:
        raise sandbox.SandboxUnavailable(
            "bubblewrap (bwrap) is missing or unusable: refusing to run untrusted code. "
            "Install it (apt-get install bubblewrap) or pass allow_unsafe=True."
        )
    if not tests:
        return 0.0
    tests = parse_tests("code_reward", tests, "tests")
    if language != "python" and any(is_call_test(t) or is_check_test(t) for t in tests):
        raise Refusal("call tests and check tests need a Python program: language must be python")
    source = extract_program(completion).encode()
    limits = sandbox.Limits(wall_s=timeout_s)
    if language == "python":
        if not os.path.exists(sandbox.SANDBOX_PYTHON):
            raise RuntimeError(f"{sandbox.SANDBOX_PYTHON} is missing: install the system python3")
        files, argv = {"main.py": source}, [sandbox.SANDBOX_PYTHON, "-I", "main.py"]
    else:
        binary = compile_cpp(source, allow_unsafe=allow_unsafe)
        if binary is None:
            return 0.0
        files, argv = {"main": binary}, ["./main"]

    def passes(test: dict) -> bool:
        if is_check_test(test):
            return _passes_check(test, completion, limits, allow_unsafe)
        if is_call_test(test):
            return _passes_call(test, source, limits, allow_unsafe)
        result = sandbox.run(
            argv, stdin=str(test["input"]).encode(), files=files, limits=limits,
            allow_unsafe=allow_unsafe,
        )  # fmt: skip
        got = result.stdout.decode("utf-8", errors="replace")
        return result.ok and normalize_output(got) == normalize_output(str(test["output"]))

    return 1.0 if _all_pass(passes, tests, max_workers) else 0.0


def _all_pass(passes, tests: list[dict], max_workers: int | None) -> bool:
    """Whether `passes(test)` holds for every test, the tests run on a few threads at once."""
    workers = max_workers or min(len(tests), os.cpu_count() or 1, 4)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(passes, t) for t in tests]
        for future in futures:
            if not future.result():
                for f in futures:  # one failure decides: skip the tests not started yet
                    f.cancel()
                return False
    return True


def _passes_call(test: dict, source: bytes, limits: sandbox.Limits, allow_unsafe: bool) -> bool:
    token = secrets.token_hex(16)
    spec = {"fn_name": test["fn_name"], "args": test["args"], "token": token}
    result = sandbox.run(
        [sandbox.SANDBOX_PYTHON, "-I", "harness.py"], stdin=json.dumps(spec).encode(),
        files={"main.py": source, "harness.py": CALL_HARNESS.encode()}, limits=limits,
        allow_unsafe=allow_unsafe,
    )  # fmt: skip
    prefix = token.encode() + b" "
    if not (result.ok and result.stdout.startswith(prefix) and result.stdout.count(b"\n") == 1
            and result.stdout.endswith(b"\n")):
        return False
    try:
        got = json.loads(result.stdout[len(prefix) :])
    except ValueError:
        return False
    expected = test["expected"]
    # APPS/TACO often wrap the return value in a list ([3] for 3), and not always: both count.
    wrapped = test.get("unwrap") and isinstance(expected, list) and len(expected) == 1
    return same_value(got, expected) or bool(wrapped and same_value(got, expected[0]))


def _passes_check(test: dict, completion: str, limits: sandbox.Limits, allow_unsafe: bool) -> bool:
    token = secrets.token_hex(16)
    spec = {"setup": test["setup"], "check": test["check"], "entry_point": test["entry_point"], "token": token}
    program = assemble_program(completion, test).encode()
    result = sandbox.run(
        [sandbox.SANDBOX_PYTHON, "-I", "harness.py"], stdin=json.dumps(spec).encode(),
        files={"main.py": program, "harness.py": CHECK_HARNESS.encode()}, limits=limits,
        allow_unsafe=allow_unsafe,
    )  # fmt: skip
    return result.ok and result.stdout == token.encode() + b"\n"


def compile_cpp(source: bytes, *, allow_unsafe: bool = False) -> bytes | None:
    """Compile C++ inside the sandbox; the binary, or None when compilation fails."""
    if shutil.which("g++", path="/usr/local/bin:/usr/bin:/bin") is None:
        raise RuntimeError("g++ is not installed: cannot verify C++ programs")
    limits = sandbox.Limits(wall_s=30, memory_mb=4096, total_memory_mb=4096, max_procs=32, file_mb=64,
                            tmpfs_mb=256, output_bytes=64 << 20)  # fmt: skip
    result = sandbox.run(["sh", "-c", CPP_COMPILE], files={"main.cpp": source}, limits=limits,
                         allow_unsafe=allow_unsafe)  # fmt: skip
    return result.stdout if result.ok and result.stdout else None


def code_row_reward(completion: str, row: dict) -> float:
    """Row adapter for code_reward: the tests are row["tests"], the language (optional,
    default "python") row["language"]."""
    return code_reward(completion, row["tests"], language=row.get("language", "python"))


# ------------------------------------------------------------------------------------------
# Building the program from a completion


def _parses(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except SyntaxError:
        return None


def _compiles(code: str) -> bool:
    # compile, not ast.parse: a `return` outside any function is an error only when compiled.
    try:
        compile(code, "main.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def defines_function(code: str, name: str) -> bool:
    """True iff `code` (as it is, or dedented) defines the function `name` at its top level."""
    for text in (code, textwrap.dedent(code)):
        module = _parses(text)
        if module is not None:
            return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name
                       for node in module.body)
    return False


def _as_body(code: str) -> str:
    """`code` indented as a function body: kept as it is when its first line is indented, else indented 4."""
    lines = [line for line in code.splitlines() if line.strip()]
    if lines and not lines[0][0].isspace():
        return textwrap.indent(textwrap.dedent(code), "    ")
    return code


def assemble_program(completion: str, test: dict) -> str:
    """The program a completion stands for (its last fenced block when it has one, else all of it).

    MBPP (no prompt): the code as it is. HumanEval: when the code defines the entry point itself it is the
    whole function, put after the prompt (whose imports and helpers it may use; its own definition replaces
    the prompt's empty one); otherwise it is the body, appended to the prompt (indented when written flush).
    """
    code = extract_program(completion)
    prompt = test["prompt"]
    if not prompt:
        return code
    if defines_function(code, test["entry_point"]):
        whole = code if _parses(code) is not None else textwrap.dedent(code)
        return prompt.rstrip() + "\n\n\n" + whole.strip("\n") + "\n"
    body = prompt + code
    if not _compiles(body) and _compiles(prompt + _as_body(code)):
        body = prompt + _as_body(code)
    return body.rstrip() + "\n"
