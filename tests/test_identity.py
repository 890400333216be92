"""A run's results follow from its settings alone: evaluating during training changes nothing the training
draws, a resumed stage cannot mix two schedules, collection is the same resumed or not, an evaluation is
reused only under its own settings, one process writes into a run directory at a time, and a restarted
stage leaves none of the outputs it fed. On a tiny local model and a local JSONL."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdzero.config import load_config
from sdzero.distill import DistillConfig, distill
from sdzero.evaluate import evaluate
from sdzero.generation import SamplingConfig, make_generator, own_random_state
from sdzero.modeling import load_model
from sdzero.pipeline import run_pipeline
from sdzero.prompts import ControlPhrases
from sdzero.rundir import hold_run, release_run
from tiny import even_length, refused, sdzero, tiny_home

TESTS = Path(__file__).parent
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A tiny model, 40 problems, and a run config for them."""
    return tiny_home(tmp_path_factory.mktemp("identity"), 40, {
        "n_phase1": 8, "n_phase2": 8, "sampling": {"max_new_tokens": 10},
        "collect": {"chunk_size": 4},
        "srt": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "save_every": 1},
        "distill": {"prompts_per_step": 4, "micro_batch_size": 2, "max_steps": 3, "lr": 1e-3, "warmup_steps": 1,
                    "keep_best": False, "save_every": 1},
        "eval": {"k": 1, "n_problems": 4, "curve_problems": 2, "curve_k": 2, "revise_problems": 0},
    })


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# 1. Evaluation cannot change training


def test_own_random_state_leaves_the_callers_draws_as_they_were():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with own_random_state(11):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected), "the caller's stream moved"
    torch.manual_seed(0)
    with own_random_state(11):
        assert torch.equal(torch.rand(3), inside), "the seed alone decides the draws inside"


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["loop", "generate"])
def test_phase2_with_eval_every_ends_with_the_weights_of_a_run_without(home, tmp_path, decoder):
    """Both decoders of the transformers backend: sdzero's own loop, and `generate` (the tiny model's
    generation_config has a length penalty, which only `generate` applies)."""
    problems = [{"id": f"p{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(8)]
    held_out = [{"id": f"h{i}", "problem": f"What is {i} times 3?", "answer": str(3 * i)} for i in range(3)]
    sampling = SamplingConfig(max_new_tokens=10)

    def phase2(eval_every, seed=0) -> str:
        student, tokenizer = load_model(str(home / "tiny"), device="cpu")
        if decoder == "loop":
            student.generation_config.exponential_decay_length_penalty = None
        generator = make_generator(student, tokenizer, sampling)
        curve = lambda model: evaluate(generator, held_out, even_length, k=2, progress=False,  # noqa: E731
                                       seed=seed)["accuracy"]
        torch.manual_seed(seed)
        summary = distill(student, tokenizer, problems, even_length, ControlPhrases(), sampling,
                          DistillConfig(prompts_per_step=4, micro_batch_size=2, max_steps=4, lr=5e-3, warmup_steps=1,
                                        eval_every=eval_every, keep_best=False, save_every=None),
                          seed=seed, evaluate_fn=curve, progress=False, generator=generator)
        steps = [h["step"] for h in summary["history"]]
        assert steps == {None: [], 1: [0, 1, 2, 3, 4], 3: [0, 3, 4]}[eval_every]
        student.save_pretrained(tmp_path / f"{decoder}-{eval_every}-{seed}")
        return sha256(tmp_path / f"{decoder}-{eval_every}-{seed}" / "model.safetensors")

    without = phase2(None)
    assert phase2(1) == without
    assert phase2(3) == without
    assert phase2(None, seed=1) != without, "the weights do not depend on the rollouts' draws: the test sees nothing"


@pytest.mark.slow
def test_a_run_with_eval_every_ends_with_the_models_of_a_run_without(home, tmp_path):
    models = {}
    for eval_every in (None, 1):
        cfg = load_config(home / "run.yaml", [f"distill.eval_every={'null' if eval_every is None else eval_every}"])
        report = run_pipeline(cfg, tmp_path / str(eval_every), progress=False, log=QUIET)
        assert len(report["phase2_curve"]) == (0 if eval_every is None else 4)
        models[eval_every] = [sha256(tmp_path / str(eval_every) / stage / "model.safetensors")
                              for stage in ("srt", "sdzero")]
    assert models[1] == models[None]
    # without eval_every there is no curve to draw: no plot of flat lines
    assert not (tmp_path / "None" / "learning_curve.png").exists()
    assert (tmp_path / "1" / "learning_curve.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------
# 2, 3, 6. Stage identity: srt.batch_size, collect.chunk_size, and what --restart moves


@pytest.fixture(scope="module")
def staged(home) -> Path:
    """collect, srt and distill (eval_every 1, so a report and a learning curve exist) into one run directory."""
    run = home / "runs" / "staged"
    assert sdzero(home, "run", "--out", run, "--set", "distill.eval_every=1") == 0
    return run


@pytest.mark.slow
@pytest.mark.parametrize("args, named", [
    (["srt", "--resume", "--set", "srt.batch_size=4"], "srt.batch_size: 2 -> 4"),
    (["collect", "--set", "collect.chunk_size=8"], "collect.chunk_size: 4 -> 8"),
])
def test_a_setting_that_shapes_a_stage_is_refused_naming_it(home, staged, capsys, args, named):
    before = snapshot(staged)
    err = refused(home, capsys, args[0], "--out", staged, *args[1:], "--set", "distill.eval_every=1")
    assert named in err and "--restart" in err
    assert snapshot(staged) == before, "a refused command changed the run directory"


@pytest.mark.slow
def test_speed_settings_may_change_between_commands_of_a_stage(home, staged, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(staged, run)
    assert sdzero(home, "distill", "--out", run, "--resume", "--set", "distill.eval_every=1",
                  "--set", "sampling.batch_size=3", "--set", "distill.micro_batch_size=1") == 0


@pytest.mark.slow
def test_a_collection_resumed_with_its_chunk_size_collects_what_an_uninterrupted_one_does(home, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert sdzero(home, "collect", "--out", whole) == 0
    assert sdzero(home, "collect", "--out", resumed) == 0
    # as if killed after the first chunk of 4 problems: keep their lines, then collect again
    attempts = (resumed / "phase1" / "attempts.jsonl").read_text().splitlines(keepends=True)
    done = {json.loads(line)["id"] for line in attempts[:4]}
    revisions = (resumed / "phase1" / "revisions.jsonl").read_text().splitlines(keepends=True)
    (resumed / "phase1" / "attempts.jsonl").write_text("".join(attempts[:4]))
    (resumed / "phase1" / "revisions.jsonl").write_text(
        "".join(line for line in revisions if json.loads(line)["id"] in done))
    assert sdzero(home, "collect", "--out", resumed) == 0
    for name in ("attempts.jsonl", "revisions.jsonl"):
        assert (resumed / "phase1" / name).read_text() == (whole / "phase1" / name).read_text(), name


@pytest.mark.slow
def test_restarting_phase2_moves_the_report_and_the_curve_it_fed(home, staged, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(staged, run)
    report, curve = (run / "report.json").read_bytes(), (run / "learning_curve.png").read_bytes()
    assert sdzero(home, "distill", "--out", run, "--set", "distill.lr=0.01", "--restart") == 0
    stale = next((run / "stale").iterdir())
    assert (stale / "report.json").read_bytes() == report and (stale / "learning_curve.png").read_bytes() == curve
    assert (stale / "sdzero").is_dir() and (stale / "eval").is_dir()
    assert not (run / "report.json").exists() and not (run / "learning_curve.png").exists()


# ------------------------------------------------------------------------------------------
# 4. A reused evaluation


@pytest.mark.slow
def test_a_resumed_run_reuses_an_evaluation_only_under_its_settings(home, staged, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(staged, run)
    capsys.readouterr()
    assert sdzero(home, "run", "--out", run, "--resume", "--set", "distill.eval_every=1") == 0
    out = capsys.readouterr().out
    assert "[base] avg@1 = " in out and "(evaluated before; reused)" in out
    assert sdzero(home, "run", "--out", run, "--resume", "--set", "distill.eval_every=1", "--set", "eval.k=2") == 0
    out = capsys.readouterr().out
    assert "evaluated before; reused" not in out and "k: 1 -> 2" in out
    for stage in ("base", "srt", "sdzero"):
        rows = (run / "eval" / f"{stage}.jsonl").read_text().splitlines()
        assert len(rows) == 2 * 4, f"{stage}: avg@2 on 4 problems is 8 answers"
        assert json.loads((run / "eval" / f"{stage}.json").read_text())["k"] == 2
    assert json.loads((run / "report.json").read_text())["metric"] == "avg@2"


# ------------------------------------------------------------------------------------------
# 5. One writer per run directory


@pytest.mark.slow
def test_a_second_command_on_a_run_directory_in_use_is_refused_naming_the_first(home, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "sdzero.cli", "collect", "--out", str(run), "--config", str(home / "run.yaml"),
               "--quiet", "--task", "test_identity:slow_even_length"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while first.poll() is None and not (run / "phase1" / "settings.json").exists():
            time.sleep(0.01)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1 and "is in use by another sdzero command" in err
        assert f"pid {first.pid}: " in err and "collect --out" in err
    finally:
        first.kill()
        first.wait()
    # the kernel let go of the killed holder's lock: the next command goes on with the collection
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [json.loads(line)["id"] for line in (run / "phase1" / "attempts.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 8, "every problem collected exactly once"


def slow_even_length(completion: str, row: dict) -> float:
    """`even_length`, slowly: a collection long enough to start a second command during it."""
    time.sleep(0.2)
    return even_length(completion, row)


def test_the_lock_is_per_process_and_reentrant(tmp_path):
    folder = tmp_path / "run"
    assert hold_run(folder) is True
    assert hold_run(folder) is False  # this process holds it already
    probe = [sys.executable, "-c", "import sys; from sdzero.rundir import hold_run; hold_run(sys.argv[1])", str(folder)]
    held = subprocess.run(probe, capture_output=True, text=True)
    assert held.returncode != 0 and f"pid {os.getpid()}" in held.stderr
    release_run(folder)
    assert subprocess.run(probe, capture_output=True, text=True).returncode == 0


# ------------------------------------------------------------------------------------------
# 7. Smaller refusals and repairs


@pytest.mark.parametrize("override, named", [
    ("seed=9223372036854775807", "seed must be in [0, 4294967295]"),
    ("seed=-1", "seed must be in [0, 4294967295]"),
    ("sampling.temperature=.inf", "sampling.temperature: expected a finite number, got inf"),
    ("distill.lr=.nan", "distill.lr: expected a finite number, got nan"),
])
def test_out_of_range_seeds_and_non_finite_numbers_are_refused_at_validation(override, named):
    with pytest.raises(ValueError) as refusal:
        load_config(None, [override])
    assert named in str(refusal.value)
    assert load_config(None, ["seed=4294967295"]).seed == 4294967295


def boom(completion: str, row: dict) -> float:
    raise RuntimeError("boom in reward")


def test_a_reward_function_that_raises_is_named_with_the_problem(home, tmp_path, capsys):
    err = refused(home, capsys, "collect", "--out", tmp_path / "run", "--task", "test_identity:boom")
    assert "the reward function 'boom' failed on problem q" in err and "RuntimeError: boom in reward" in err


def test_a_jsonl_with_a_byte_order_mark_is_read(home, tmp_path):
    from sdzero.data import _read_jsonl

    plain = home / "problems.jsonl"
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert [row for _, row in _read_jsonl(marked)] == [row for _, row in _read_jsonl(plain)]
