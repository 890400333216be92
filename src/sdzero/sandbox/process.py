"""The processes of one run: its inputs as memory files, the sandbox's PID 1, the output read under the wall-time
and size caps, and the kill and reaping that leave no process behind."""

from __future__ import annotations

import ctypes
import json
import os
import select
import selectors
import signal
import subprocess
import time

from sdzero.sandbox.limits import Limits, SandboxResult

_PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


def memfile(data: bytes) -> int:
    """An anonymous in-memory file holding `data`, positioned at its start."""
    fd = os.memfd_create("sandbox", 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def sandbox_init(info_r: int, bwrap_pid: int) -> tuple[int | None, int | None]:
    """The host PID of the sandbox's PID 1 and a pidfd pinning it, read from bwrap's --info-fd;
    (None, None) when bwrap failed before making it."""
    data = bytearray()
    while chunk := os.read(info_r, 4096):  # bwrap closes it right after writing
        data += chunk
    try:
        pid = int(json.loads(data)["child-pid"])
        pidfd = os.pidfd_open(pid)
    except (ValueError, KeyError, TypeError, OSError):
        return None, None
    try:  # the pidfd guards against PID reuse, the parent check that it is this run's sandbox
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        ppid = None
    if ppid != bwrap_pid:
        os.close(pidfd)
        return None, None
    return pid, pidfd


def collect(proc: subprocess.Popen, limits: Limits, init_pidfd: int | None) -> SandboxResult:
    """Read the run's output under the wall-time and size caps, then make sure it is over."""
    deadline = time.monotonic() + limits.wall_s
    stdout_fd, stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
    out = {stdout_fd: bytearray(), stderr_fd: bytearray()}
    timed_out = exceeded = False
    sel = selectors.DefaultSelector()
    for fd in out:
        sel.register(fd, selectors.EVENT_READ)
    open_streams = len(out)
    try:
        while open_streams and not exceeded:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    open_streams -= 1
                else:
                    out[key.fd] += chunk
                    exceeded = exceeded or len(out[key.fd]) > limits.output_bytes
        if not (timed_out or exceeded):
            try:  # both streams are closed: wait for the exit itself
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        sel.close()
        if proc.poll() is None:
            kill(proc, init_pidfd)
        proc.stdout.close()
        proc.stderr.close()
    # The CPU-time limit (RLIMIT_CPU, the wall time by default) can end a busy loop just before the wall clock
    # does: killed by SIGXCPU (bwrap reports a child's signal as 128 + its number), which is a time-out too.
    if proc.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        timed_out = True
    return SandboxResult(
        returncode=None if (timed_out or exceeded) else proc.returncode,
        stdout=bytes(out[stdout_fd][: limits.output_bytes]),
        stderr=bytes(out[stderr_fd][: limits.output_bytes]),
        timed_out=timed_out,
        output_exceeded=exceeded,
    )


def kill(proc: subprocess.Popen, init_pidfd: int | None) -> None:
    """Kill a run and wait until none of its processes is left."""
    # Killing PID 1 of the sandbox's PID namespace makes the kernel kill every process in it,
    # and PID 1 is only reaped after they are all gone: so waiting for bwrap (which reaps it)
    # waits for the whole sandbox.
    if init_pidfd is not None:
        try:
            signal.pidfd_send_signal(init_pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# ------------------------------------------------------------------------------------------
# Reaping. bwrap exits as soon as its program does, before its own child (the sandbox's PID 1)
# has been reaped. That orphan goes to the nearest subreaper, else to PID 1 of our PID
# namespace: a trainer running as PID 1 of a container without an init would collect a zombie
# per run. So this process becomes a subreaper and reaps that one process itself, by pidfd
# (never waitpid(-1), which would steal other children's exit statuses).


_subreaper_pid: int | None = None  # the process that made itself one (a forked child is not)


def become_subreaper() -> None:
    global _subreaper_pid
    if _subreaper_pid != os.getpid():
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        _subreaper_pid = os.getpid()


def reap(pidfd: int) -> None:
    """Wait until the sandbox's PID 1 has exited, and reap it if it was left to us."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)  # readable once the process has exited
    if not poller.poll(5000):  # its parent bwrap is gone, so --die-with-parent is killing it
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        poller.poll()
    try:
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    except ChildProcessError:
        pass  # bwrap reaped it, or an init that is not us did
