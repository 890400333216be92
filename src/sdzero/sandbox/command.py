"""The command line that starts a sandboxed run: bubblewrap's namespaces and mounts, then prlimit's caps on each
process; and the plain rlimits of the unsafe mode."""

from __future__ import annotations

import os
import resource
import shutil

from sdzero.sandbox.limits import Limits

# The system interpreter: the sandbox shows /usr only, so a virtualenv's python is not there.
SANDBOX_PYTHON = "/usr/bin/python3"
WORKDIR = "/sandbox"
# The unprivileged identity that runs the sandbox when the caller is root (see popen_identity).
NOBODY = 65534
# The PATH a sandboxed program sees, and where bwrap and prlimit are looked up.
SEARCH_PATH = "/usr/local/bin:/usr/bin:/bin"
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives")


def tool_path(name: str) -> str | None:
    path = shutil.which(name, path=SEARCH_PATH)
    return os.path.realpath(path) if path else None


def bwrap_args(limits: Limits, files: dict[str, int]) -> list[str]:
    tmpfs = str(limits.tmpfs_mb << 20)
    args = [
        tool_path("bwrap"),
        "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--disable-userns",
        "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox",
        "--die-with-parent", "--new-session",
        "--clearenv", "--setenv", "PATH", SEARCH_PATH, "--setenv", "LANG", "C.UTF-8",
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


def prlimit_args(limits: Limits) -> list[str]:
    # Set inside the sandbox's user namespace, so the process count is this sandbox's own
    # (the kernel counts RLIMIT_NPROC per user namespace) and not every process of the uid.
    cpu = limits.cpu_seconds()
    return [
        tool_path("prlimit"),
        f"--cpu={cpu}:{cpu + 1}",
        f"--as={limits.memory_mb << 20}",
        f"--nproc={limits.max_procs}",
        f"--fsize={limits.file_mb << 20}",
        "--nofile=256",
        "--core=0",
        "--",
    ]


def popen_identity() -> dict:
    # RLIMIT_NPROC does not bind for root (uid 0 outside the namespace), so a root caller
    # starts bwrap as nobody: the sandbox then holds no host privileges at all and the
    # process limit is enforced.
    if os.geteuid() == 0:
        return {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    return {}


def set_rlimits(limits: Limits) -> None:
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
