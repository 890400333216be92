"""Sharded training for real: SRT and Phase 2 (with teacher sync, evaluations and checkpoints) on the tiny
model sharded with torch's FSDP2 over two gloo processes on the CPU (tests/fsdp_run.py says how)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny import build_tiny_model

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One two-process run; the tests below read what it left."""
    tmp = tmp_path_factory.mktemp("fsdp")
    model = build_tiny_model(tmp / "model")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
               str(TESTS / "fsdp_run.py"), str(model), str(tmp / "run")]
    # CPUs and gloo, also on a machine with a GPU (benchmarks/gpu_check.py runs this test there)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = f"{TESTS}:{env.get('PYTHONPATH', '')}"
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return model, tmp / "run"


def weights(path: Path) -> dict:
    return torch.load(path)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def metrics(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def test_both_processes_end_with_the_same_full_weights_and_training_moved_them(run):
    model, out = run
    ranks = [weights(out / f"rank{r}.pt") for r in (0, 1)]
    assert same(ranks[0]["own"], ranks[1]["own"]), "the processes hold different weights"
    assert same(ranks[0]["own"], ranks[0]["kept"])  # what every process holds is what rank 0 gathered
    start = AutoModelForCausalLM.from_pretrained(model).state_dict()
    assert not same(ranks[0]["srt"], start) and not same(ranks[0]["straight"], ranks[0]["srt"])


def test_a_resumed_phase2_ends_as_an_uninterrupted_one(run):
    _, out = run
    rank0 = weights(out / "rank0.pt")
    assert same(rank0["resumed"], rank0["straight"])
    straight, resumed = metrics(out / "straight"), metrics(out / "resumed")
    assert resumed == straight  # the same rollouts, losses, evaluations and teacher versions, each logged once
    # the teacher was synchronised (at steps 2 and 4) and the evaluations ran (at steps 0, 2 and 4)
    assert [m["sdzero/teacher_version"] for m in straight if "loss" in m] == [0, 0, 1, 1]
    assert [m["step"] for m in straight if "eval/accuracy" in m] == [0, 2, 4]


def test_keep_best_restores_the_sharded_weights_of_the_best_evaluation(run):
    _, out = run
    rank0 = weights(out / "rank0.pt")
    assert same(rank0["kept"], rank0["resumed"])  # the best evaluation was the first, before any step
    assert [m["sdzero/grad_norm"] > 0 for m in metrics(out / "keep_best") if "loss" in m] == [True, True]


def test_the_saved_stages_load_in_plain_transformers_with_the_gathered_weights(run):
    _, out = run
    rank0 = weights(out / "rank0.pt")
    for stage, expected in (("srt", rank0["srt"]), ("straight", rank0["straight"])):
        assert same(AutoModelForCausalLM.from_pretrained(out / stage).state_dict(), expected), stage
