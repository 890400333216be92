"""Many sandboxed programs from several threads: does anything leak, and how many runs per second?

    python benchmarks/sandbox_load.py                      # 3000 runs, 4 threads
    python benchmarks/sandbox_load.py --pid1               # the same as PID 1 of a fresh PID namespace
    python benchmarks/sandbox_load.py --runs 200 --quick   # smoke run

The programs cycle through a mix: most print and exit, some leave a daemon behind, some write to
/tmp and /dev/shm, some hold memory in forked children, some loop until the wall time. Before and
after, it counts this process's open descriptors, its child processes and the zombies in its PID
namespace, the sandbox cgroups left, the system's shared memory (tmpfs pages) and available
memory, and this process's resident memory. Output is one `name: value` line per figure; the exit
status is 1 when a descriptor, process, zombie or cgroup is left over.

--pid1 re-runs this script under `unshare --pid --fork --mount-proc` (root, or a user namespace),
so that this process is PID 1 and every orphan comes to it, as in a container without an init.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sdzero import sandbox  # noqa: E402

PY = [sandbox.SANDBOX_PYTHON, "-I", "main.py"]
PROGRAMS = {
    "print": ("print(sum(range(1000)))", 1.0),
    "daemon": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('bye')", 1.0),
    "files": ("for d in ('/tmp', '/dev/shm', '.'):\n    open(d + '/f', 'wb').write(b'x' * (4 << 20))\n"
              "print('written')", 1.0),
    "memory": ("import os\nfor _ in range(3):\n    if os.fork() == 0:\n        x = bytearray(64 << 20)\n"
               "        os._exit(0)\nfor _ in range(3):\n    os.wait()\nprint('held')", 2.0),
    "loop": ("while True:\n    pass", 0.3),
}
# Out of every 20 runs: mostly the cheap kind, as in a real batch of tests.
MIX = ["print"] * 12 + ["daemon"] * 3 + ["files"] * 2 + ["memory"] * 2 + ["loop"]


def meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) >> 10 for line in f}  # MiB


def own_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def children() -> list[int]:
    pids = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def zombies() -> int:
    count = 0
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                count += f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except (OSError, IndexError):
            pass
    return count


def cgroups_left() -> int:
    parents = sandbox._cgroup_parents()
    if parents is None:
        return 0
    prefix = f"sdzero-{os.getpid()}-"
    return sum(name.startswith(prefix) for d in parents[1].values() for name in os.listdir(d))


def snapshot() -> dict:
    info = meminfo()
    return {"fds": len(os.listdir("/proc/self/fd")), "children": len(children()), "zombies": zombies(),
            "cgroups": cgroups_left(), "shmem_mb": info["Shmem"], "available_mb": info["MemAvailable"],
            "rss_mb": own_rss_mb()}


def one_run(i: int) -> tuple[str, bool]:
    kind = MIX[i % len(MIX)]
    src, wall_s = PROGRAMS[kind]
    result = sandbox.run(PY, files={"main.py": src.encode()}, limits=sandbox.Limits(wall_s=wall_s))
    expected_ok = kind != "loop"
    return kind, result.ok == expected_ok and (result.timed_out or kind != "loop")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--pid1", action="store_true", help="run as PID 1 of a new PID namespace")
    parser.add_argument("--quick", action="store_true", help="only the cheap 'print' program")
    args = parser.parse_args()
    if args.pid1 and os.getpid() != 1:
        unshare = ["unshare", "--pid", "--fork", "--mount-proc"]
        if os.geteuid() != 0:
            unshare[1:1] = ["--user", "--map-root-user"]
        argv = [a for a in sys.argv[1:] if a != "--pid1"]
        return subprocess.call([*unshare, sys.executable, __file__, *argv])
    if not sandbox.sandbox_available():
        print("sandbox: unavailable (bubblewrap missing)")
        return 1
    global MIX
    if args.quick:
        MIX = ["print"]
    with ThreadPoolExecutor(args.threads) as pool:  # warm up: imports, cgroup set-up, worker threads
        list(pool.map(one_run, range(args.threads)))
    before = snapshot()
    start = time.monotonic()
    with ThreadPoolExecutor(args.threads) as pool:
        outcomes = list(pool.map(one_run, range(args.runs)))
    elapsed = time.monotonic() - start
    time.sleep(0.5)  # let the kernel finish freeing the last sandboxes' pages
    after = snapshot()
    wrong = [kind for kind, as_expected in outcomes if not as_expected]
    print(f"pid: {os.getpid()}")
    print(f"cgroup: {'yes' if sandbox._cgroup_parents() else 'no (degraded mode)'}")
    print(f"cpus: {os.cpu_count()}")
    print(f"runs: {args.runs}")
    print(f"threads: {args.threads}")
    print(f"mix: {'print only' if args.quick else ', '.join(f'{MIX.count(k)}/{len(MIX)} {k}' for k in PROGRAMS)}")
    print(f"elapsed_s: {elapsed:.1f}")
    print(f"runs_per_s: {args.runs / elapsed:.1f}")
    print(f"unexpected_results: {len(wrong)}" + (f" ({', '.join(sorted(set(wrong)))})" if wrong else ""))
    for key in before:
        print(f"{key}_before: {before[key]:.0f}")
        print(f"{key}_after: {after[key]:.0f}")
    leaked = any(after[k] > before[k] for k in ("fds", "children", "zombies", "cgroups"))
    print(f"leaks: {'yes' if leaked else 'none'}")
    return 1 if leaked or wrong else 0


if __name__ == "__main__":
    if not shutil.which("bwrap"):
        print("sandbox: unavailable (bubblewrap missing)")
        sys.exit(1)
    sys.exit(main())
