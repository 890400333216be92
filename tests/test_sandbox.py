"""The sandbox against hostile programs.

Every attack is written in a bounded form (at most ~1000 forks, 4 GB, 200 MB of output, a few
seconds), so that a sandbox bug fails a test instead of taking the machine down.
"""

import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from sdzero import sandbox
from sdzero.tasks.code import code_reward

pytestmark = pytest.mark.skipif(
    not sandbox.sandbox_available(), reason="bubblewrap missing (apt-get install bubblewrap)"
)

PY = [sandbox.SANDBOX_PYTHON, "-I", "main.py"]


def run_py(src: str, stdin: str = "", **limits) -> sandbox.SandboxResult:
    return sandbox.run(PY, stdin=stdin.encode(), files={"main.py": src.encode()},
                       limits=sandbox.Limits(**limits))  # fmt: skip


def reward(src: str, expected: str, timeout_s: float = 3.0) -> float:
    block = f"```python\n{src}\n```"
    return code_reward(block, [{"input": "", "output": expected}], timeout_s=timeout_s)


def host_processes_with(marker: str) -> list[int]:
    """PIDs of host processes whose command line contains `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_plain_run_and_stdin():
    res = run_py("import sys\nprint(sum(map(int, sys.stdin.read().split())))", "1 2 3\n")
    assert res.ok and res.stdout == b"6\n" and res.sandboxed


def test_runs_as_unprivileged_user_on_the_host():
    marker = f"marker-{uuid.uuid4().hex}"
    src = f"import os, time\nprint(os.getuid(), flush=True)\ntime.sleep(1)  # {marker}"
    argv = [sandbox.SANDBOX_PYTHON, "-I", "-c", src]  # the marker shows in the command line
    box = {}
    worker = threading.Thread(target=lambda: box.update(res=sandbox.run(argv)))
    worker.start()
    deadline = time.time() + 4
    while not (pids := host_processes_with(marker)) and time.time() < deadline:
        time.sleep(0.05)
    host_uids = set()
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            host_uids |= {int(line.split()[1]) for line in f if line.startswith("Uid:")}
    worker.join()
    assert pids and box["res"].stdout == b"65534\n"
    if os.geteuid() == 0:
        assert host_uids == {sandbox.NOBODY}  # not root on the host: RLIMIT_NPROC binds


def test_fork_bomb_is_capped():
    src = """
import os, time
n = 0
for _ in range(1000):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(2)
        os._exit(0)
    n += 1
print(n)
"""
    res = run_py(src, wall_s=5, max_procs=16)
    assert res.ok and int(res.stdout) < 16
    assert reward(src, "1000") == 0.0


def test_concurrent_sandboxes_have_separate_process_budgets():
    src = """
import os, time
n = 0
for _ in range(100):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(1)
        os._exit(0)
    n += 1
print(n)
"""
    results = [None, None]

    def go(i):
        results[i] = run_py(src, wall_s=5, max_procs=10)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Sharing one budget, the two would get about 8 forks together; each gets its own.
    counts = [int(r.stdout) for r in results]
    assert min(counts) >= 6 and max(counts) < 10


def test_memory_bomb_fails():
    src = "x = bytearray(4 << 30)\nprint('allocated')"
    res = run_py(src, memory_mb=512)
    assert not res.ok and b"MemoryError" in res.stderr
    assert reward(src, "allocated") == 0.0


def test_infinite_loop_times_out():
    start = time.monotonic()
    assert reward("while True:\n    pass", "", timeout_s=2.0) == 0.0
    assert time.monotonic() - start < 5
    res = run_py("while True:\n    pass", wall_s=1.0)
    assert res.timed_out and res.returncode is None


def test_a_loop_stopped_by_the_cpu_time_limit_is_a_time_out():
    # The CPU limit (1 s) ends the loop long before the wall clock (10 s) would: SIGXCPU, reported as a time-out.
    start = time.monotonic()
    res = run_py("while True:\n    pass", wall_s=10.0, cpu_s=1.0)
    assert res.timed_out and res.returncode is None
    assert time.monotonic() - start < 8


def test_output_flood_is_cut_off():
    src = "import sys\nfor _ in range(200 * 16):\n    sys.stdout.write('x' * 65536)"
    start = time.monotonic()
    res = run_py(src, output_bytes=1 << 20)
    assert res.output_exceeded and len(res.stdout) == 1 << 20
    assert time.monotonic() - start < 5
    assert reward(src, "x") == 0.0


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.setblocking(False)
    port = server.getsockname()[1]
    src = f"""
import socket
s = socket.socket()
s.settimeout(1)
try:
    s.connect(("127.0.0.1", {port}))
    print("connected")
except OSError as e:
    print("refused", e)
try:
    socket.create_connection(("pypi.org", 443), timeout=1)
    print("internet")
except OSError:
    pass
"""
    try:
        res = run_py(src)
        assert b"connected" not in res.stdout and b"internet" not in res.stdout
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody knocked
    finally:
        server.close()


def test_host_files_are_invisible(tmp_path):
    secret = f"secret-{uuid.uuid4().hex}"
    (tmp_path / "secret.txt").write_text(secret)
    paths = [str(tmp_path / "secret.txt"), __file__, "/root", "/work", "/home", "/etc/passwd"]
    src = f"""
import os
for p in {paths!r}:
    try:
        print(open(p).read() if os.path.isfile(p) else os.listdir(p))
    except OSError as e:
        print("denied", p, type(e).__name__)
"""
    res = run_py(src)
    assert res.ok and secret.encode() not in res.stdout
    assert res.stdout.count(b"denied") == len(paths)
    assert reward(f"print(open({str(tmp_path / 'secret.txt')!r}).read())", secret) == 0.0


def test_cannot_write_outside(tmp_path):
    target = tmp_path / "host.txt"
    target.write_text("original")
    src = f"""
for p in [{str(target)!r}, "/usr/pwned", "/etc/pwned", "/pwned"]:
    try:
        open(p, "w").write("pwned")
        print("wrote", p)
    except OSError:
        pass
"""
    res = run_py(src)
    assert res.ok and b"wrote" not in res.stdout
    assert target.read_text() == "original"
    assert not os.path.exists("/usr/pwned") and not os.path.exists("/etc/pwned")


def test_disk_filling_is_capped():
    src = """
import os
written = 0
for d in ("/tmp", "."):
    for i in range(50):
        try:
            with open(f"{d}/f{i}", "wb") as f:
                f.write(b"x" * (4 << 20))
            written += 4
        except OSError:
            break
print(written)
"""
    res = run_py(src, tmpfs_mb=16, file_mb=8)
    assert res.ok and int(res.stdout) <= 32  # 200 MB attempted, 2 x 16 MB allowed


def test_environment_is_not_visible(monkeypatch):
    secret = f"token-{uuid.uuid4().hex}"
    monkeypatch.setenv("SDZERO_TEST_SECRET", secret)
    res = run_py("import os\nprint(dict(os.environ))\nprint(open('/proc/1/environ').read())")
    assert secret.encode() not in res.stdout + res.stderr
    assert reward("import os\nprint(os.environ.get('SDZERO_TEST_SECRET'))", secret) == 0.0


def test_killing_the_parent_leaves_the_host_alive():
    canary = subprocess.Popen(["sleep", "30"])
    try:
        src = "import os, signal\nos.kill(os.getppid(), 9)\nos.kill(-1, 9)\nprint('done')"
        run_py(src)
        res = sandbox.run(["sh", "-c", "kill -9 -1; kill -9 0; echo alive"])
        assert res.returncode != 0 or res.stdout == b"alive\n"
        time.sleep(0.2)
        assert canary.poll() is None  # a host process was untouched
        assert reward(src, "done") == 0.0
    finally:
        canary.kill()
        canary.wait()


@pytest.mark.parametrize("main_behaviour", ["exits", "hangs"])
def test_no_process_survives_the_verdict(tmp_path, main_behaviour):
    marker = f"daemon-{uuid.uuid4().hex}"
    flag = tmp_path / "late.txt"
    src = f"""
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("{sandbox.SANDBOX_PYTHON}", ["python3", "-c",
            "import time; time.sleep(1.5); open({str(flag)!r}, 'w').write('late')  # {marker}"])
    os._exit(0)
time.sleep(0.3)
print("started", flush=True)
{"while True: pass" if main_behaviour == "hangs" else ""}
"""
    res = run_py(src, wall_s=1.5)
    assert res.stdout == b"started\n"
    assert host_processes_with(marker) == []  # gone when the verdict returns
    time.sleep(1.8)
    assert not flag.exists()


def test_refuses_without_bubblewrap(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_available", lambda: False)
    good = "```python\nprint(input())\n```"
    with pytest.raises(sandbox.SandboxUnavailable):
        code_reward(good, [{"input": "hi", "output": "hi"}])
    with pytest.raises(sandbox.SandboxUnavailable):
        sandbox.run(["/bin/true"])
    with pytest.warns(RuntimeWarning, match="UNSANDBOXED"):
        assert code_reward(good, [{"input": "hi", "output": "hi"}], allow_unsafe=True) == 1.0


def test_dev_is_read_only_and_dev_shm_is_capped():
    src = """
written = 0
for i in range(20):
    try:
        with open(f"/dev/shm/f{i}", "wb") as f:
            f.write(b"x" * (4 << 20))
        written += 4
    except OSError:
        break
try:
    open("/dev/big", "wb").write(b"x")
    print("wrote /dev")
except OSError as e:
    print(type(e).__name__)
open("/dev/null", "w").write("device nodes still work")
print(written)
"""
    res = run_py(src, tmpfs_mb=16, file_mb=8)
    assert res.ok, res.stderr
    lines = res.stdout.split()
    assert lines[0] == b"OSError" and int(lines[1]) <= 16  # 80 MB attempted, 16 MB allowed


needs_cgroup = pytest.mark.skipif(
    not sandbox._cgroup_parents(), reason="no writable memory+pids cgroup on this machine (degraded mode)"
)


def shmem_mb() -> int:
    """The system's tmpfs and shared-memory pages, MiB."""
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) >> 10 for line in f if line.startswith("Shmem:"))


@needs_cgroup
def test_memory_is_capped_for_the_sandbox_as_a_whole():
    # Each piece is under its own limit (150 MB per process, 64 MB per tmpfs); together they are
    # 618 MB against a 256 MB cap. Without the cgroup the program prints "held everything".
    src = """
import os, time
children = []
for _ in range(3):
    pid = os.fork()
    if pid == 0:
        x = bytearray(150 << 20)
        for i in range(0, len(x), 4096):
            x[i] = 1
        time.sleep(1)
        os._exit(0)
    children.append(pid)
files_mb = 0
for d in ("/tmp", "/dev/shm", "."):
    for i in range(7):
        try:
            with open(f"{d}/f{i}", "wb") as f:
                f.write(b"x" * (8 << 20))
            files_mb += 8
        except OSError:
            break
ok = all(os.waitpid(pid, 0)[1] == 0 for pid in children)
print("held everything" if ok and files_mb == 168 else "refused", files_mb)
"""
    res = run_py(src, wall_s=10, tmpfs_mb=64, total_memory_mb=256)
    assert b"held everything" not in res.stdout
    assert res.memory_exceeded
    assert res.peak_memory_bytes <= 256 << 20


@needs_cgroup
def test_memory_held_in_files_is_back_after_the_run():
    before = shmem_mb()
    src = """
for d in ("/tmp", "/dev/shm", "."):
    for i in range(7):
        with open(f"{d}/f{i}", "wb") as f:
            f.write(b"x" * (8 << 20))
import time
time.sleep(0.2)
print(open("/proc/meminfo").read().split("Shmem:")[1].split()[0])
"""
    res = run_py(src, tmpfs_mb=64)
    assert res.ok, res.stderr
    held_mb = int(res.stdout) >> 10
    assert held_mb - before >= 160  # the sandbox really held 168 MB of tmpfs pages
    assert res.peak_memory_bytes >= 168 << 20
    assert shmem_mb() - before < 32  # and they are freed with it


def test_threads_count_against_the_process_cap():
    # RLIMIT_NPROC and the cgroup's pids.max both count threads as processes.
    src = """
import threading, time
n = 0
for _ in range(200):
    try:
        threading.Thread(target=time.sleep, args=(1,), daemon=True).start()
    except RuntimeError:
        break
    n += 1
print(n)
"""
    res = run_py(src, max_procs=12)
    assert res.ok, res.stderr
    assert 0 < int(res.stdout) < 12


def test_without_a_cgroup_runs_degrade_with_one_warning(monkeypatch, capsys):
    # Mocked: a machine with no writable cgroup (this one has one).
    monkeypatch.setattr(sandbox, "_own_cgroup_dirs", lambda: "no cgroup here (test)")
    monkeypatch.setattr(sandbox, "_warned_no_cgroup", False)
    sandbox._cgroup_parents.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no cgroup for the sandbox: no cgroup here"):
            first = run_py("print('hi')")
        second = run_py("print('hi')")
        assert first.ok and second.ok and first.peak_memory_bytes is None
        assert capsys.readouterr().err.count("no cgroup for the sandbox") == 1
    finally:
        sandbox._cgroup_parents.cache_clear()


@pytest.mark.slow
def test_nothing_leaks_under_load_as_pid_1():
    """200 mixed runs (daemons, timeouts, files, forks) from 4 threads, as PID 1 of a PID namespace
    where nothing else reaps: no zombie, descriptor, child process or cgroup is left."""
    unshare = ["unshare", "--pid", "--fork", "--mount-proc"]
    if os.geteuid() != 0:
        unshare[1:1] = ["--user", "--map-root-user"]
    if subprocess.run([*unshare, "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare cannot make a PID namespace here")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "sandbox_load.py")
    proc = subprocess.run([sys.executable, script, "--pid1", "--runs", "200", "--threads", "4"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    figures = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert figures.get("pid") == "1", proc.stdout + proc.stderr
    assert figures["unexpected_results"] == "0"
    for what in ("zombies", "fds", "children", "cgroups"):
        assert figures[f"{what}_after"] == figures[f"{what}_before"], what
    assert figures["zombies_after"] == "0" and figures["children_after"] == "0"
    assert proc.returncode == 0


FORKED_WORKER = """
import os, sys, time
from sdzero import sandbox
sandbox.run(["/bin/true"])  # this process becomes a subreaper
pid = os.fork()
if pid == 0:  # a forked worker (as multiprocessing makes them) is not one until it says so
    for _ in range(10):
        sandbox.run(["/bin/true"])
    os._exit(0)
os.waitpid(pid, 0)
time.sleep(0.3)
print(open(f"/proc/self/task/{os.getpid()}/children").read().split())
"""


def test_forked_workers_reap_their_own_sandboxes():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", FORKED_WORKER], capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"  # no zombie of the worker's sandboxes left to the parent
