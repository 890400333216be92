"""The cgroup of one run. Rlimits cap each process; a cgroup caps the sandbox as a whole: the memory of all its
processes together with every page of its tmpfs mounts, shared memory and pipes (the kernel charges those to the
cgroup of the process that made them), and its number of processes. One cgroup per run, a child of this process's
own cgroup: cgroup v1 (a "memory" and a "pids" hierarchy) or v2 (one hierarchy with both controllers)."""

from __future__ import annotations

import itertools
import os
import time

from sdzero.sandbox.limits import Limits

CONTROLLERS = ("memory", "pids")
_run_ids = itertools.count()


def write_value(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def remove_stale(parent: str) -> None:
    # Cgroups left by a process that died mid-run (empty by now: their processes died with it).
    for name in os.listdir(parent):
        owner = name.split("-")[1] if name.startswith("sdzero-") else ""
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            try:
                os.rmdir(os.path.join(parent, name))
            except OSError:
                pass


class Cgroup:
    """The cgroup of one run: made with its caps, joined by the sandbox, removed after it.

    `parents` is (1 or 2, {controller or "": directory}): where the per-run cgroups go."""

    def __init__(self, limits: Limits, parents: tuple[int, dict[str, str]]) -> None:
        self.version, parent_dirs = parents
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
                        write_value(path, value)
        except OSError:
            self.remove()
            raise

    def add(self, *pids: int) -> None:
        for directory in self.dirs.values():
            for pid in pids:
                write_value(os.path.join(directory, "cgroup.procs"), pid)

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
