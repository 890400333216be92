"""Peak memory of a piece of work, measured in a fresh child process so nothing an earlier measurement left
behind counts: the peak of live tensor bytes from torch's own allocator records, or the rise of the process's
peak RSS. benchmarks/README.md explains both."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys

from common import DEVICE, MB  # first: it sets the environment torch reads when it loads
import torch

METHODS = {"tensors": "peak_memory_mb", "rss": "peak_rss_mb"}
"""Measurement -> the suffix of its figures' names. RSS only on the CPU."""


def methods() -> dict[str, str]:
    return METHODS if DEVICE == "cpu" else {"tensors": METHODS["tensors"]}


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs sets the process's peak RSS (VmHWM) back to its current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (C++ libraries write there directly) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class TensorPeak:
    """Peak bytes of live tensors allocated inside the `with` block, from torch's own allocator records.

    On CPU, torch.profiler(profile_memory=True) logs every tensor allocation and free together with the
    running total of the bytes it has seen allocated since profiling began; the peak is the largest running
    total. On CUDA, torch.cuda.max_memory_allocated above the level at entry.
    """

    def __init__(self):
        self.peak_mb = float("nan")

    def __enter__(self):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with quiet_stderr():  # the profiler's start/stop notices
                self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / MB
            return False
        with quiet_stderr():
            self.prof.__exit__(*exc)
        if exc[0] is None:
            from torch._C._profiler import _EventType

            peak, stack = 0, list(self.prof.profiler.kineto_results.experimental_event_tree())
            while stack:
                event = stack.pop()
                if event.tag == _EventType.Allocation and str(event.extra_fields.device) == "cpu":
                    peak = max(peak, event.extra_fields.total_allocated)
                stack.extend(event.children)
            self.peak_mb = peak / MB
        return False


def measure(method: str, work) -> tuple[float | None, str]:
    """(MB that `work()` added at its peak, "") by `method`, or (None, why not)."""
    if method == "tensors":
        with TensorPeak() as peak:
            work()
        return peak.peak_mb, ""
    base = _status_kb("VmRSS")
    if base is None or not _reset_peak_rss():
        # Without clear_refs the only peak is the lifetime one, which may come from loading: no number.
        return None, "peak RSS needs Linux /proc/self/clear_refs"
    work()
    return (_status_kb("VmHWM") - base) / 1024, ""


def warm_up_runtime(model, ids: list[int]) -> None:
    """Load the code a training step uses on first call, before a baseline: the model's forward on a few
    tokens, and autograd, gradient clipping and AdamW on a throwaway layer."""
    with torch.no_grad():
        model(input_ids=torch.tensor([ids], device=DEVICE))
    scratch = torch.nn.Linear(8, 8).to(DEVICE)
    optimizer = torch.optim.AdamW(scratch.parameters())
    scratch(torch.ones(2, 8, device=DEVICE)).sum().backward()
    torch.nn.utils.clip_grad_norm_(scratch.parameters(), 1.0)
    optimizer.step()


def _child(target, args: tuple, queue) -> None:
    try:
        queue.put(target(*args))
    except BaseException as err:  # report, don't hang the parent
        queue.put((None, f"{type(err).__name__}: {err}"))


def in_child(target, *args) -> tuple[float | None, str]:
    """`target(*args)` -> (value, why it is missing) in a fresh process (multiprocessing "spawn")."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(target, args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result
