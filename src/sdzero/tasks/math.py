"""The math task: problems with a gold answer, judged by math-verify on the last \\boxed{...} of a response.

A math row is `{"id", "problem", "answer"}`; `gold_answer` reads its answer (or the last box of a `solution`).
`math_reward` runs math-verify in a worker process (`_MathWorker`), so that a check can be killed at a hard deadline.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import selectors
import subprocess
import sys
import threading
from pathlib import Path

from sdzero.errors import Refusal

MATH_INSTRUCTION = "Solve the problem step by step, then give the final answer in \\boxed{}."

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
        src = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from sdzero.tasks.math import _serve_math; _serve_math()"],
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


def extract(completion: str, row: dict) -> str | None:
    """The contents of the completion's last \\boxed{...}, the answer math_row_reward reads; None when it has none."""
    return last_boxed(completion)


def math_row_reward(completion: str, row: dict) -> float:
    """Row adapter for math_reward: the gold answer is row["answer"]."""
    return math_reward(completion, row["answer"])


def gold_answer(where: str, row: dict, answer_field: str, solution_field: str | None) -> tuple[str | None, str]:
    """(answer, "") or (None, why it was skipped). A value holding \\boxed{...} gives its last box;
    a value from `solution_field` must hold one (a whole solution is never an answer)."""
    value = row.get(answer_field)
    if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
        got = type(value).__name__
        raise Refusal(f"{where}: field {answer_field!r} must be a string or a number, got {got}")
    if isinstance(value, float) and math.isnan(value):  # NaN: how pandas-written files mark a missing value
        value = None
    source = answer_field
    blank = value is None or not str(value).strip()
    if blank and solution_field and isinstance(row.get(solution_field), str):
        value, source = row[solution_field], solution_field
    if value is None or not str(value).strip():
        return None, f"no {answer_field!r}" + (f" and no {solution_field!r}" if solution_field else "")
    text = str(value)
    if "\\boxed" in text or source == solution_field:
        boxed = last_boxed(text)
        if boxed is None or not boxed.strip():
            return None, f"no complete \\boxed{{...}} in {source!r}"
        return boxed.strip(), ""
    return text.strip(), ""
