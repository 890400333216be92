"""Run untrusted programs (model-generated code) in an OS-level sandbox.

The sandbox is bubblewrap (`bwrap`): fresh user, PID, network, IPC and UTS namespaces; read-only
system directories (/usr and the few /etc files the dynamic linker needs), nothing of the host's
home or project directories; empty size-capped tmpfs for /tmp and the working directory
/sandbox; a cleared environment. Inside, `prlimit` caps CPU time, address space, processes,
file size and open files; the parent enforces the wall time and the output size. See
docs/sandbox.md for the threat model.

    result = run(["/usr/bin/python3", "-I", "main.py"], files={"main.py": src}, stdin=b"1 2\n")
    result.ok, result.stdout

Program files and stdin travel through memory files (memfd), never through the host's
filesystem, and no expected output ever enters the sandbox.
"""

from __future__ import annotations

import math
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache

# The system interpreter: the sandbox shows /usr only, so a virtualenv's python is not there.
SANDBOX_PYTHON = "/usr/bin/python3"
WORKDIR = "/sandbox"
# The unprivileged identity that runs the sandbox when the caller is root (see _popen_identity).
NOBODY = 65534
_PATH = "/usr/local/bin:/usr/bin:/bin"
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives")
_CHILD_PID_RE = re.compile(rb'"child-pid"\s*:\s*(\d+)')


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces on this machine."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    wall_s: float = 5.0
    cpu_s: float | None = None  # None: the wall time
    memory_mb: int = 1024  # address space of each process
    max_procs: int = 16  # processes and threads inside the sandbox
    file_mb: int = 16  # largest file the program may write
    tmpfs_mb: int = 64  # size of /tmp and of /sandbox each
    output_bytes: int = 8 << 20  # per stream; the run is killed beyond it

    def cpu_seconds(self) -> int:
        return max(1, math.ceil(self.wall_s if self.cpu_s is None else self.cpu_s))


@dataclass
class SandboxResult:
    """What a run produced. `returncode` is None when the run was killed by the parent."""

    returncode: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False
    output_exceeded: bool = False
    sandboxed: bool = True

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded


def _tool(name: str) -> str | None:
    path = shutil.which(name, path=_PATH)
    return os.path.realpath(path) if path else None


@lru_cache(maxsize=1)
def sandbox_available() -> bool:
    """True iff bwrap and prlimit exist and a trivial sandboxed run succeeds on this machine."""
    if not (sys.platform.startswith("linux") and _tool("bwrap") and _tool("prlimit")):
        return False
    stdin = _memfile(b"")
    try:
        return _run_bwrap(["/bin/true"], stdin, {}, Limits(wall_s=10)).returncode == 0
    except OSError:
        return False
    finally:
        os.close(stdin)


def _memfile(data: bytes) -> int:
    """An anonymous in-memory file holding `data`, positioned at its start."""
    fd = os.memfd_create("sandbox", 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _bwrap_args(limits: Limits, files: dict[str, int]) -> list[str]:
    tmpfs = str(limits.tmpfs_mb << 20)
    args = [
        _tool("bwrap"),
        "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--disable-userns",
        "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox",
        "--die-with-parent", "--new-session",
        "--clearenv", "--setenv", "PATH", _PATH, "--setenv", "LANG", "C.UTF-8",
        "--setenv", "HOME", WORKDIR,
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    # Merged-/usr systems have these as symlinks into /usr; older ones as real directories.
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for name in _ETC_FILES:
        if os.path.exists("/etc/" + name):
            args += ["--ro-bind", "/etc/" + name, "/etc/" + name]
    args += ["--proc", "/proc", "--dev", "/dev"]
    args += ["--size", tmpfs, "--tmpfs", "/tmp", "--size", tmpfs, "--tmpfs", WORKDIR]
    for name, fd in files.items():
        args += ["--perms", "0555", "--file", str(fd), f"{WORKDIR}/{name}"]
    # The root itself is a private tmpfs without a size cap: make it read-only once set up.
    return args + ["--remount-ro", "/", "--chdir", WORKDIR]


def _prlimit_args(limits: Limits) -> list[str]:
    # Set inside the sandbox's user namespace, so the process count is this sandbox's own
    # (the kernel counts RLIMIT_NPROC per user namespace) and not every process of the uid.
    cpu = limits.cpu_seconds()
    return [
        _tool("prlimit"),
        f"--cpu={cpu}:{cpu + 1}",
        f"--as={limits.memory_mb << 20}",
        f"--nproc={limits.max_procs}",
        f"--fsize={limits.file_mb << 20}",
        "--nofile=256",
        "--core=0",
        "--",
    ]


def _popen_identity() -> dict:
    # RLIMIT_NPROC does not bind for root (uid 0 outside the namespace), so a root caller
    # starts bwrap as nobody: the sandbox then holds no host privileges at all and the
    # process limit is enforced.
    if os.geteuid() == 0:
        return {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    return {}


def _set_rlimits(limits: Limits) -> None:
    cpu = limits.cpu_seconds()
    for res, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (limits.memory_mb << 20,) * 2),
        (resource.RLIMIT_NPROC, (limits.max_procs,) * 2),
        (resource.RLIMIT_FSIZE, (limits.file_mb << 20,) * 2),
        (resource.RLIMIT_NOFILE, (256, 256)),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(res, value)


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
        raise ValueError("file names must be plain names")
    fds = [_memfile(stdin)]
    try:
        if sandbox_available():
            file_fds = {name: _memfile(data) for name, data in files.items()}
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
    info_r, info_w = os.pipe()
    args = _bwrap_args(limits, files) + ["--info-fd", str(info_w), "--"]
    args += _prlimit_args(limits) + list(argv)
    try:
        proc = subprocess.Popen(
            args,
            stdin=stdin_fd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(info_w, *files.values()),
            cwd="/",
            env={"PATH": _PATH},
            start_new_session=True,
            **_popen_identity(),
        )
    finally:
        os.close(info_w)
    with os.fdopen(info_r, "rb", buffering=0) as info:
        return _collect(proc, limits, info)


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
            env={"PATH": _PATH, "LANG": "C.UTF-8", "HOME": tmp},
            start_new_session=True,
            preexec_fn=lambda: _set_rlimits(limits),
        )
        result = _collect(proc, limits, None)
        try:  # leftovers in the program's session (the best this mode can do)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        result.sandboxed = False
        return result


def _collect(proc: subprocess.Popen, limits: Limits, info) -> SandboxResult:
    """Read the run's output under the wall-time and size caps, then make sure it is over."""
    deadline = time.monotonic() + limits.wall_s
    stdout_fd, stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
    out = {stdout_fd: bytearray(), stderr_fd: bytearray()}
    info_data = bytearray()
    timed_out = exceeded = False
    sel = selectors.DefaultSelector()
    for fd in out:
        sel.register(fd, selectors.EVENT_READ)
    if info is not None:
        sel.register(info.fileno(), selectors.EVENT_READ)
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
                    open_streams -= key.fd in out
                elif key.fd in out:
                    out[key.fd] += chunk
                    exceeded = exceeded or len(out[key.fd]) > limits.output_bytes
                else:
                    info_data += chunk
        if not (timed_out or exceeded):
            try:  # both streams are closed: wait for the exit itself
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        sel.close()
        if proc.poll() is None:
            _kill(proc, info_data)
        proc.stdout.close()
        proc.stderr.close()
    return SandboxResult(
        returncode=None if (timed_out or exceeded) else proc.returncode,
        stdout=bytes(out[stdout_fd][: limits.output_bytes]),
        stderr=bytes(out[stderr_fd][: limits.output_bytes]),
        timed_out=timed_out,
        output_exceeded=exceeded,
    )


def _kill(proc: subprocess.Popen, info_data: bytes) -> None:
    """Kill a run and wait until none of its processes is left."""
    match = _CHILD_PID_RE.search(info_data)
    if match:
        _kill_namespace_init(int(match.group(1)), proc.pid)
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


def _kill_namespace_init(pid: int, bwrap_pid: int) -> None:
    # Killing PID 1 of the sandbox's PID namespace makes the kernel kill every process in it,
    # and PID 1 is only reaped after they are all gone: so waiting for bwrap (which reaps it)
    # waits for the whole sandbox. The pidfd pins the process against PID reuse, and the
    # parent check makes sure it is this run's sandbox.
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        if ppid == bwrap_pid:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass
    finally:
        os.close(pidfd)
