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
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import os
import resource
import select
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

from sdzero.errors import Refusal

# The system interpreter: the sandbox shows /usr only, so a virtualenv's python is not there.
SANDBOX_PYTHON = "/usr/bin/python3"
WORKDIR = "/sandbox"
# The unprivileged identity that runs the sandbox when the caller is root (see _popen_identity).
NOBODY = 65534
_PATH = "/usr/local/bin:/usr/bin:/bin"
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives")
_PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces on this machine."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    wall_s: float = 5.0
    cpu_s: float | None = None  # None: the wall time
    memory_mb: int = 1024  # address space of each process
    total_memory_mb: int = 2048  # all the sandbox holds at once: processes, files, /dev/shm (cgroup)
    max_procs: int = 16  # processes and threads inside the sandbox (rlimit; cgroup pids.max too)
    file_mb: int = 16  # largest file the program may write
    tmpfs_mb: int = 64  # size of /tmp, /dev/shm and /sandbox each
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
    memory_exceeded: bool = False  # the cgroup's memory cap was hit (a process was OOM-killed)
    peak_memory_bytes: int | None = None  # most the sandbox held at once; None without a cgroup

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
    # bwrap's /dev is a tmpfs of half the host's RAM: read-only, with its own small /dev/shm.
    # Writes to device nodes (/dev/null) still work on a read-only mount.
    args += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]
    for path in ("/dev/shm", "/tmp", WORKDIR):
        args += ["--size", tmpfs, "--tmpfs", path]
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
        raise Refusal("file names must be plain names")
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
    _become_subreaper()
    cgroup = _Cgroup(limits) if _cgroup_parents() else None
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    args = _bwrap_args(limits, files)
    args += ["--info-fd", str(info_w), "--block-fd", str(block_r), "--"]
    args += _prlimit_args(limits) + list(argv)
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
                env={"PATH": _PATH},
                start_new_session=True,
                **_popen_identity(),
            )
        finally:
            os.close(info_w)
            os.close(block_r)
        # bwrap reports its sandbox's PID 1, then waits on block_fd before that PID 1 starts
        # anything: both join the cgroup here, so every process of the sandbox is inside it.
        try:
            init_pid, init_pidfd = _sandbox_init(info_r, proc.pid)
            if init_pid is None:
                _kill(proc, None)  # bwrap failed in its set-up (its error is on stderr): start nothing
            else:
                if cgroup is not None:
                    cgroup.add(proc.pid, init_pid)
                os.write(block_w, b"1")
        except BrokenPipeError:
            pass  # bwrap failed just after reporting: _collect reports its error
        except BaseException:
            _kill(proc, init_pidfd)
            proc.stdout.close()
            proc.stderr.close()
            raise
        result = _collect(proc, limits, init_pidfd)
    finally:
        os.close(info_r)
        os.close(block_w)
        if init_pidfd is not None:
            _reap(init_pidfd)
            os.close(init_pidfd)
        if cgroup is not None:
            peak, oom = cgroup.usage()
            cgroup.remove()
    if cgroup is not None:
        result.peak_memory_bytes, result.memory_exceeded = peak, oom
    return result


def _sandbox_init(info_r: int, bwrap_pid: int) -> tuple[int | None, int | None]:
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


def _collect(proc: subprocess.Popen, limits: Limits, init_pidfd: int | None) -> SandboxResult:
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
            _kill(proc, init_pidfd)
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


def _kill(proc: subprocess.Popen, init_pidfd: int | None) -> None:
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


def _become_subreaper() -> None:
    global _subreaper_pid
    if _subreaper_pid != os.getpid():
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        _subreaper_pid = os.getpid()


def _reap(pidfd: int) -> None:
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


# ------------------------------------------------------------------------------------------
# Cgroups. Rlimits cap each process; a cgroup caps the sandbox as a whole: the memory of all its
# processes together with every page of its tmpfs mounts, shared memory and pipes (the kernel
# charges those to the cgroup of the process that made them), and its number of processes.
# One cgroup per run, a child of this process's own cgroup: cgroup v1 (a "memory" and a "pids"
# hierarchy) or v2 (one hierarchy with both controllers).

_CONTROLLERS = ("memory", "pids")
_run_ids = itertools.count()
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
        names = [c for c in _CONTROLLERS if c in options] if fstype == "cgroup" else [""] * (fstype == "cgroup2")
        for name in names:
            rel = os.path.relpath(paths.get(name, "/.."), root)
            if not rel.startswith(".."):
                directory = os.path.normpath(os.path.join(point, rel))
                if name:
                    v1[name] = directory
                else:
                    v2 = directory
    if set(v1) == set(_CONTROLLERS):
        return 1, v1
    if v2 is not None:
        try:
            with open(os.path.join(v2, "cgroup.controllers")) as f:
                available = f.read().split()
        except OSError:
            available = []
        if set(_CONTROLLERS) <= set(available):
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
                _remove_stale(parent)
            if version == 2:  # let the children have both controllers
                _write(os.path.join(parents[""], "cgroup.subtree_control"), "+memory +pids")
            trial = _Cgroup(Limits(), parents=found)
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


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _remove_stale(parent: str) -> None:
    # Cgroups left by a process that died mid-run (empty by now: their processes died with it).
    for name in os.listdir(parent):
        owner = name.split("-")[1] if name.startswith("sdzero-") else ""
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            try:
                os.rmdir(os.path.join(parent, name))
            except OSError:
                pass


class _Cgroup:
    """The cgroup of one run: made with its caps, joined by the sandbox, removed after it."""

    def __init__(self, limits: Limits, parents: tuple[int, dict[str, str]] | None = None) -> None:
        self.version, parent_dirs = parents or _cgroup_parents()
        name = f"sdzero-{os.getpid()}-{next(_run_ids)}"
        self.dirs = {c: os.path.join(d, name) for c, d in parent_dirs.items()}
        memory = limits.total_memory_mb << 20
        procs = limits.max_procs + 2  # bwrap and the sandbox's PID 1 count too
        if self.version == 1:  # memsw (memory + swap) exists only with swap accounting
            caps = {"memory": {"memory.limit_in_bytes": memory, "memory.memsw.limit_in_bytes": memory},
                    "pids": {"pids.max": procs}}  # fmt: skip
        else:
            caps = {"": {"memory.max": memory, "memory.swap.max": 0, "pids.max": procs}}
        try:
            for controller, directory in self.dirs.items():
                os.mkdir(directory)
                for file, value in caps[controller].items():
                    path = os.path.join(directory, file)
                    if "swap" not in file and "memsw" not in file or os.path.exists(path):
                        _write(path, value)
        except OSError:
            self.remove()
            raise

    def add(self, *pids: int) -> None:
        for directory in self.dirs.values():
            for pid in pids:
                _write(os.path.join(directory, "cgroup.procs"), pid)

    def _memory_dir(self) -> str:
        return self.dirs["memory" if self.version == 1 else ""]

    def usage(self) -> tuple[int | None, bool]:
        """(the most memory the run held at once, whether the memory cap killed a process)."""
        peak_file, events_file = ("memory.max_usage_in_bytes", "memory.oom_control") if self.version == 1 \
            else ("memory.peak", "memory.events")  # fmt: skip
        try:
            with open(os.path.join(self._memory_dir(), peak_file)) as f:
                peak = int(f.read())
        except (OSError, ValueError):
            peak = None  # memory.peak is missing before Linux 5.19
        try:
            with open(os.path.join(self._memory_dir(), events_file)) as f:
                events = dict(line.split() for line in f)
            oom = int(events.get("oom_kill", 0)) > 0
        except (OSError, ValueError):
            oom = False
        return peak, oom

    def remove(self) -> None:
        for directory in self.dirs.values():
            for _ in range(100):  # the last exits may take a moment to leave the cgroup
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
