"""Verifiers: (completion, problem row) -> reward in {0.0, 1.0}.

A problem row is a dict with at least "id", "problem" and "answer". Every stage takes its verifier
as a plain callable with this signature, so a user's own reward function drops in unchanged.

- "lab":  the shipped lab task ("Answer: N").
- "math": the last \\boxed{...} of the completion, checked against row["answer"] with math-verify.
- "code": the last fenced code block, run in the sandbox against row["tests"]: stdin/stdout tests,
  call tests that call a function (or a `class Solution` method) and compare its return value, or
  check tests (HumanEval's check function, MBPP's asserts) that run in the program's process.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import secrets
import selectors
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from sdzero import sandbox
from sdzero.errors import Refusal
from sdzero.lab.task import extract_answer

Verifier = Callable[[str, dict], float]


def lab_reward(completion: str, row: dict) -> float:
    """1.0 iff the last "Answer: N" of the completion equals the row's answer."""
    return 1.0 if extract_answer(completion) == str(row["answer"]) else 0.0


# ------------------------------------------------------------------------------------------
# Math

# Answers past these sizes are rejected before parsing: real final answers are far smaller,
# and the parser's cost grows steeply with length and nesting.
MAX_ANSWER_CHARS = 1000
MAX_BRACE_DEPTH = 40


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} in `text` (nested braces kept), or None.

    None also when that last box is never closed, e.g. a completion cut off mid-answer.
    """
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth, i, begin = 0, i, i + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # \{ and \} are literal braces, not groups
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None


def _too_big(answer: str) -> bool:
    if len(answer) > MAX_ANSWER_CHARS:
        return True
    depth = 0
    for ch in answer:
        depth += (ch in "{([") - (ch in "})]")
        if depth > MAX_BRACE_DEPTH:
            return True
    return False


class _MathWorker:
    """A child process that runs math-verify, so that a check can be killed at a hard deadline.

    math-verify's own timeouts use SIGALRM, which only works on a process's main thread and
    cannot interrupt long C-level arithmetic. The child runs the checks on its main thread (so
    those timeouts work there) and the parent kills it when the deadline passes; a new one is
    started on the next call. It is a plain subprocess, so it also works inside daemonic
    multiprocessing workers, which may not have multiprocessing children.
    """

    START_TIMEOUT_S = 60.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        src = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from sdzero.verifiers import _serve_math; _serve_math()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        if self._read_line(self.START_TIMEOUT_S) != {"ready": True}:
            self.stop()
            raise RuntimeError("the math-verify worker did not start (is math-verify installed?)")

    def _read_line(self, timeout_s: float):
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=timeout_s):
                return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                stream.close()
            self.proc = None

    def check(self, pred: str, gold: str, timeout_s: float) -> bool:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.stop()
                self._start()
            request = {"pred": pred, "gold": gold, "timeout": _op_timeout(timeout_s)}
            try:
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                self.proc.stdin.flush()
                reply = self._read_line(timeout_s)
            except (OSError, ValueError):
                reply = None
            if not isinstance(reply, dict) or "ok" not in reply:
                self.stop()  # timed out or crashed: the next call starts a fresh worker
                return False
            return bool(reply["ok"])


def _op_timeout(timeout_s: float) -> int:
    """The worker's own per-step budget (parse gold, parse prediction, verify), whole seconds."""
    return max(1, int(timeout_s) // 3)


def _serve_math() -> None:
    """Worker loop: one JSON request per line on stdin, one JSON reply per line on stdout."""
    import logging
    import resource

    # Keep the protocol channel to ourselves: library prints go to stderr (discarded).
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    logging.disable(logging.CRITICAL)
    # Runaway arithmetic (e.g. 10^(10^10)) fails with MemoryError instead of eating the host.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from math_verify import parse, verify

    channel.write(json.dumps({"ready": True}) + "\n")
    channel.flush()
    for line in sys.stdin:
        ok = False
        try:
            req = json.loads(line)
            t = int(req["timeout"])  # signal-based timeouts: fine, this is the main thread
            gold = parse("\\boxed{" + req["gold"] + "}", parsing_timeout=t)
            pred = parse("\\boxed{" + req["pred"] + "}", parsing_timeout=t)
            ok = bool(gold and pred and verify(gold, pred, timeout_seconds=t))
        except BaseException:  # noqa: BLE001 - any failure is a wrong answer, never a crash
            ok = False
        channel.write(json.dumps({"ok": ok}) + "\n")
        channel.flush()


_MATH = _MathWorker()


def _reset_after_fork() -> None:
    # A forked child must not share the parent's worker pipes (or a lock held at fork time).
    global _MATH
    _MATH = _MathWorker()


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(lambda: _MATH.stop())  # whichever worker is this process's own at exit


def math_reward(completion: str, answer: str, *, timeout_s: float = 6.0) -> float:
    """1.0 iff the last \\boxed{...} of `completion` is mathematically equal to `answer`.

    `answer` may be plain ("3/4") or boxed. The check takes at most about `timeout_s` seconds
    and is safe from any thread or process; oversized or pathological answers score 0.0.
    """
    pred = last_boxed(completion)
    gold = last_boxed(str(answer)) if "\\boxed" in str(answer) else str(answer)
    if pred is None or gold is None or not pred.strip() or _too_big(pred) or _too_big(gold):
        return 0.0
    return 1.0 if _MATH.check(pred, gold, timeout_s) else 0.0


def math_row_reward(completion: str, row: dict) -> float:
    """Row adapter for math_reward: the gold answer is row["answer"]."""
    return math_reward(completion, row["answer"])


# ------------------------------------------------------------------------------------------
# Code

_FENCE_RE = re.compile(r"```([^\n`]*)\n(.*?)```", re.DOTALL)
CPP_COMPILE = "g++ -std=c++17 -O2 -pipe -o main main.cpp 1>&2 && cat main"


LANGUAGES = {"python": "python", "py": "python", "python3": "python", "cpp": "cpp", "c++": "cpp"}
"""The languages the code verifier runs, by every name a dataset's `language` column may use."""


def code_language(name: str) -> str:
    """"python" or "cpp" for any of their names in LANGUAGES; an error for anything else."""
    if not isinstance(name, str) or name.lower() not in LANGUAGES:
        raise Refusal(f"unsupported language {name!r}; use one of {', '.join(LANGUAGES)}")
    return LANGUAGES[name.lower()]


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


def is_call_test(test: dict) -> bool:
    """A call test {"fn_name", "args", "expected"}, as opposed to a stdin test {"input", "output"}."""
    return "fn_name" in test


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

    `tests` is any form `sdzero.data.parse_tests` reads: stdin tests [{"input", "output"}, ...]
    (stdin = input, stdout == output after trimming trailing whitespace per line and at the end),
    call tests [{"fn_name", "args", "expected"}, ...] (the function, or that method of
    `class Solution`, called with args inside the sandbox; its return value compared with
    `same_value`), APPS/TACO's {"fn_name", "inputs", "outputs"}, or check tests
    [{"check", "entry_point", "prompt", "setup"}] (HumanEval's check function, MBPP's asserts; the program
    is built by `sdzero.codesuites.assemble_program`, see there). Each test runs in its own
    sandbox with a `timeout_s` wall-time limit. `language` is "python" or "cpp" (needs g++; stdin
    tests only). Without bubblewrap this raises SandboxUnavailable unless `allow_unsafe`.
    """
    from sdzero.codesuites import is_check_test
    from sdzero.data import parse_tests

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

    workers = max_workers or min(len(tests), os.cpu_count() or 1, 4)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(passes, t) for t in tests]
        for future in futures:
            if not future.result():
                for f in futures:  # one failure decides: skip the tests not started yet
                    f.cancel()
                return 0.0
    return 1.0


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
    from sdzero.codesuites import assemble_program

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


def reasoning_gym_reward(completion: str, row: dict) -> float:
    """1.0 iff the row's reasoning-gym generator gives full marks to the answer its answer rule cuts from the
    completion (see sdzero.gym)."""
    from sdzero import gym

    return gym.score(completion, row)


def _reasoning_gym_extract(completion: str, row: dict) -> str | None:
    from sdzero import gym

    return gym.extract(completion, row)


VERIFIERS: dict[str, Verifier] = {
    "lab": lab_reward,
    "math": math_row_reward,
    "code": code_row_reward,
    "reasoning-gym": reasoning_gym_reward,
}
EXTRACTORS: dict[str, Callable[[str, dict], str | None]] = {
    "lab": lambda completion, row: extract_answer(completion),
    "math": lambda completion, row: last_boxed(completion),
    "reasoning-gym": _reasoning_gym_extract,
}
"""Per built-in task: (completion, row) -> the final answer its verifier reads, None when there is nothing to
extract (evaluation counts those answers). Your own reward function may carry one as its `extract` attribute."""


def answer_extractor(function: Callable) -> Callable[[str, dict], str | None] | None:
    """The `extract(completion, row)` of a reward function (built-in: EXTRACTORS; yours: its `extract`
    attribute), or None when it has none."""
    for name, verifier in VERIFIERS.items():
        if verifier is function:
            return EXTRACTORS.get(name)
    return getattr(function, "extract", None)


def no_answer_summary(functions: list[Callable], groups: list[list], problems: list[dict]) -> dict | None:
    """{"count", "share"} of the responses (`groups`: the samples of each problem) from which no reward function
    could extract an answer; None when none of the functions has an extractor."""
    extractors = [e for e in map(answer_extractor, functions) if e is not None]
    if not extractors:
        return None
    texts = [(sample.text, problem) for problem, group in zip(problems, groups) for sample in group]
    count = sum(all(extract(text, problem) is None for extract in extractors) for text, problem in texts)
    return {"count": count, "share": count / len(texts) if texts else 0.0}


def get_verifier(name: str) -> Verifier:
    """A built-in verifier by name, or your own reward function as "package.module:function"."""
    if name in VERIFIERS:
        return VERIFIERS[name]
    module_name, sep, function_name = name.partition(":")
    if not sep:
        raise Refusal(f"unknown verifier {name!r}; choose one of {sorted(VERIFIERS)} "
                         "or name your own function as package.module:function")
    import importlib

    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as err:
        raise Refusal(f"cannot load the reward function {name!r}: {err}") from None
    if not callable(function):
        raise Refusal(f"the reward function {name!r} is not callable")
    return function
