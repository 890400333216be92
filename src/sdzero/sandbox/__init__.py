"""Run untrusted programs (model-generated code) in an OS-level sandbox.

The sandbox is bubblewrap (`bwrap`): fresh user, PID, network, IPC and UTS namespaces; read-only
system directories (/usr and the few /etc files the dynamic linker needs), nothing of the host's
home or project directories; a read-only /dev; empty size-capped tmpfs for /tmp, /dev/shm and the
working directory /sandbox; a cleared environment. Inside, `prlimit` caps CPU time, address space,
processes, file size and open files; a cgroup made for each run caps the memory (processes and
in-memory files together) and the processes of the whole sandbox; the parent enforces the wall
time and the output size, and reaps every process the sandbox leaves it. See docs/sandbox.md for
the threat model.

    result = run(["/usr/bin/python3", "-I", "main.py"], files={"main.py": src}, stdin=b"1 2\n")
    result.ok, result.stdout

Program files and stdin travel through memory files (memfd), never through the host's
filesystem, and no expected output ever enters the sandbox.

The package's parts: limits (Limits, SandboxResult), command (the bwrap and prlimit command line), process (the
run's processes: output under the caps, kill, reaping) and cgroup (the cgroup of one run). This module runs them
together and decides, once per process, whether runs get a cgroup.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache

from sdzero.errors import Refusal
from sdzero.sandbox.cgroup import CONTROLLERS, Cgroup, remove_stale, write_value
from sdzero.sandbox.command import (NOBODY, SANDBOX_PYTHON, SEARCH_PATH, WORKDIR, bwrap_args, popen_identity,
                                    prlimit_args, set_rlimits, tool_path)
from sdzero.sandbox.limits import Limits, SandboxResult, SandboxUnavailable
from sdzero.sandbox.process import become_subreaper, collect, kill, memfile, reap, sandbox_init

__all__ = ["NOBODY", "SANDBOX_PYTHON", "WORKDIR", "Limits", "SandboxResult", "SandboxUnavailable", "run",
           "sandbox_available"]


@lru_cache(maxsize=1)
def sandbox_available() -> bool:
    """True iff bwrap and prlimit exist and a trivial sandboxed run succeeds on this machine."""
    if not (sys.platform.startswith("linux") and tool_path("bwrap") and tool_path("prlimit")):
        return False
    stdin = memfile(b"")
    try:
        return _run_bwrap(["/bin/true"], stdin, {}, Limits(wall_s=10)).returncode == 0
    except OSError:
        return False
    finally:
        os.close(stdin)


_warned_unsafe = False


def _warn_unsafe() -> None:
    global _warned_unsafe
    message = (
        "!!! sdzero.sandbox: bubblewrap is unavailable and allow_unsafe=True: untrusted code "
        "runs UNSANDBOXED with plain rlimits only (it can read your files, use the network "
        "and, as root, fork without limit). Install bubblewrap. !!!"
    )
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    if not _warned_unsafe:
        print(message, file=sys.stderr, flush=True)
        _warned_unsafe = True


def run(
    argv: list[str],
    *,
    stdin: bytes = b"",
    files: dict[str, bytes] | None = None,
    limits: Limits = Limits(),
    allow_unsafe: bool = False,
) -> SandboxResult:
    """Run `argv` in a fresh sandbox whose working directory holds `files` (read-only).

    Relative paths in `argv` resolve in that directory. Returns when the program has ended
    and every process it started is gone. Raises SandboxUnavailable when bwrap cannot be used,
    unless `allow_unsafe` is set: then the program runs directly with rlimits only.
    """
    files = files or {}
    if any("/" in name or name in ("", ".", "..") for name in files):
        raise Refusal("file names must be plain names")
    fds = [memfile(stdin)]
    try:
        if sandbox_available():
            file_fds = {name: memfile(data) for name, data in files.items()}
            fds += file_fds.values()
            return _run_bwrap(argv, fds[0], file_fds, limits)
        if not allow_unsafe:
            raise SandboxUnavailable(
                "bubblewrap (bwrap) is missing or cannot create namespaces here: refusing to "
                "run untrusted code. "
                "Install it (Debian/Ubuntu: apt-get install bubblewrap) or pass "
                "allow_unsafe=True to run without a sandbox."
            )
        _warn_unsafe()
        return _run_unsafe(argv, fds[0], files, limits)
    finally:
        for fd in fds:
            os.close(fd)


def _run_bwrap(argv: list[str], stdin_fd: int, files: dict[str, int], limits: Limits):
    become_subreaper()
    parents = _cgroup_parents()
    cgroup = Cgroup(limits, parents) if parents else None
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    args = bwrap_args(limits, files)
    args += ["--info-fd", str(info_w), "--block-fd", str(block_r), "--"]
    args += prlimit_args(limits) + list(argv)
    init_pidfd = None
    try:
        try:
            proc = subprocess.Popen(
                args,
                stdin=stdin_fd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(info_w, block_r, *files.values()),
                cwd="/",
                env={"PATH": SEARCH_PATH},
                start_new_session=True,
                **popen_identity(),
            )
        finally:
            os.close(info_w)
            os.close(block_r)
        # bwrap reports its sandbox's PID 1, then waits on block_fd before that PID 1 starts
        # anything: both join the cgroup here, so every process of the sandbox is inside it.
        try:
            init_pid, init_pidfd = sandbox_init(info_r, proc.pid)
            if init_pid is None:
                kill(proc, None)  # bwrap failed in its set-up (its error is on stderr): start nothing
            else:
                if cgroup is not None:
                    cgroup.add(proc.pid, init_pid)
                os.write(block_w, b"1")
        except BrokenPipeError:
            pass  # bwrap failed just after reporting: collect reports its error
        except BaseException:
            kill(proc, init_pidfd)
            proc.stdout.close()
            proc.stderr.close()
            raise
        result = collect(proc, limits, init_pidfd)
    finally:
        os.close(info_r)
        os.close(block_w)
        if init_pidfd is not None:
            reap(init_pidfd)
            os.close(init_pidfd)
        if cgroup is not None:
            peak, oom = cgroup.usage()
            cgroup.remove()
    if cgroup is not None:
        result.peak_memory_bytes, result.memory_exceeded = peak, oom
    return result


def _run_unsafe(argv: list[str], stdin_fd: int, files: dict[str, bytes], limits: Limits):
    with tempfile.TemporaryDirectory(prefix="sdzero-unsafe-") as tmp:
        for name, data in files.items():
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o555)
        proc = subprocess.Popen(
            list(argv),
            stdin=stdin_fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmp,
            env={"PATH": SEARCH_PATH, "LANG": "C.UTF-8", "HOME": tmp},
            start_new_session=True,
            preexec_fn=lambda: set_rlimits(limits),
        )
        result = collect(proc, limits, None)
        try:  # leftovers in the program's session (the best this mode can do)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        result.sandboxed = False
        return result


# ------------------------------------------------------------------------------------------
# Whether runs get a cgroup (sdzero.sandbox.cgroup): one under this process's own cgroup when it has the
# memory and pids controllers and is writable, else none, with a warning once.

_warned_no_cgroup = False


def _own_cgroup_dirs() -> tuple[int, dict[str, str]] | str:
    """(1 or 2, {controller or "": directory of this process's cgroup}), or why there is none."""
    try:
        with open("/proc/self/cgroup") as f:  # "hierarchy-id:controllers:path" per line
            paths = {}
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for name in controllers.split(",") if controllers else [""]:
                    paths[name] = path
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except (OSError, ValueError) as err:
        return f"cannot read this process's cgroups ({err})"
    v1, v2 = {}, None
    for fields in mounts:  # "... root mount-point ... - fstype source super-options"
        sep = fields.index("-")
        root, point, fstype, options = fields[3], fields[4], fields[sep + 1], fields[sep + 3].split(",")
        names = [c for c in CONTROLLERS if c in options] if fstype == "cgroup" else [""] * (fstype == "cgroup2")
        for name in names:
            rel = os.path.relpath(paths.get(name, "/.."), root)
            if not rel.startswith(".."):
                directory = os.path.normpath(os.path.join(point, rel))
                if name:
                    v1[name] = directory
                else:
                    v2 = directory
    if set(v1) == set(CONTROLLERS):
        return 1, v1
    if v2 is not None:
        try:
            with open(os.path.join(v2, "cgroup.controllers")) as f:
                available = f.read().split()
        except OSError:
            available = []
        if set(CONTROLLERS) <= set(available):
            return 2, {"": v2}
    return "no memory and pids cgroup controllers are mounted for this process"


@lru_cache(maxsize=1)
def _cgroup_parents() -> tuple[int, dict[str, str]] | None:
    """Where the per-run cgroups go, or None (with a one-time warning) when nowhere is writable."""
    found = _own_cgroup_dirs()
    if isinstance(found, tuple):
        version, parents = found
        try:
            for parent in parents.values():
                remove_stale(parent)
            if version == 2:  # let the children have both controllers
                write_value(os.path.join(parents[""], "cgroup.subtree_control"), "+memory +pids")
            trial = Cgroup(Limits(), found)
            trial.remove()
            return found
        except OSError as err:
            found = f"cannot create a cgroup under {', '.join(parents.values())} ({err.strerror})"
    _warn_no_cgroup(found)
    return None


def _warn_no_cgroup(reason: str) -> None:
    global _warned_no_cgroup
    if not _warned_no_cgroup:
        _warned_no_cgroup = True
        message = (
            f"sdzero.sandbox: no cgroup for the sandbox: {reason}. Each sandboxed process is still "
            "capped (address space, processes, file sizes, tmpfs sizes), but not the sandbox as a "
            "whole: one run may hold up to max_procs x memory_mb plus its tmpfs mounts. Run as root "
            "or in a delegated cgroup to cap it (docs/sandbox.md, degraded mode)."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        print(message, file=sys.stderr, flush=True)

