"""What one sandboxed run may use (Limits) and what it gives back (SandboxResult)."""

from __future__ import annotations

import math
from dataclasses import dataclass


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
