"""The command line as a user types it: every command through the `sdzero` console script, as a
subprocess, at tiny sizes, on the lab and on a tiny local Hugging Face model with a local math file.

The error paths are checked for what the README promises: exit code 2, one line on stderr, no
traceback, and nothing done before the refusal (no model loaded, no file deleted).
(`sdzero compare` runs through the same entry point in test_compare.py, and `lab pretrain` in
test_lab_task.py, at their own sizes.)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdzero.cli import COMMANDS, USAGE_ERROR, main
from tiny import build_tiny_model, hold_at, stop_at, write_problems

TESTS = Path(__file__).parent
SDZERO = shutil.which("sdzero", path=str(Path(sys.executable).parent)) or shutil.which("sdzero")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
# The lab demo's settings, scaled down so each command takes seconds.
LAB_TINY = ["--set", "sampling.max_new_tokens=100", "--set", "srt.epochs=1", "--set", "distill.prompts_per_step=8",
            "--set", "distill.micro_batch_size=4", "--set", "eval.k=2", "--set", "eval.curve_problems=4",
            "--set", "eval.curve_k=1", "--set", "eval.revise_problems=4"]


def sdzero(*args, cwd: Path, expect: int = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `sdzero ARGS` in `cwd` and check its exit code; an error exit must be one line, no traceback."""
    assert SDZERO, "the sdzero console script is not installed (pip install -e .)"
    done = subprocess.run([SDZERO, *map(str, args)], cwd=cwd, env={**ENV, **(env or {})}, capture_output=True,
                          text=True, timeout=600)
    command = " ".join(map(str, args))
    assert done.returncode == expect, f"sdzero {command}: exit {done.returncode}\n{done.stderr[-3000:]}"
    if expect:
        assert_one_line(done.stderr)
    return done


def assert_one_line(stderr: str) -> None:
    """What an error exit prints: one line, no traceback."""
    assert "Traceback" not in stderr, stderr
    assert len([line for line in stderr.splitlines() if line.strip()]) == 1, stderr


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """A user's folder: a tiny local model, a 60-row math JSONL with question / solution columns, and the
    README's my_run.yaml for them (the reward function is tests/tiny.py's, named by import path)."""
    home = tmp_path_factory.mktemp("user")
    build_tiny_model(home / "tiny")
    write_problems(home / "problems.jsonl", 60)
    settings = {
        "model": "tiny", "task": "tiny:even_length", "data": {"path": "problems.jsonl", "problem_field": "question"},
        "n_phase1": 6, "n_phase2": 8, "sampling": {"max_new_tokens": 12},
        "srt": {"epochs": 1, "batch_size": 4, "lr": 1e-3},
        "distill": {"prompts_per_step": 4, "micro_batch_size": 2, "max_steps": 2, "lr": 1e-3, "warmup_steps": 1,
                    "eval_every": 1},
        "eval": {"k": 2, "n_problems": 4, "curve_problems": 2, "curve_k": 1, "revise_problems": 2},
    }
    (home / "my_run.yaml").write_text(yaml.safe_dump(settings))
    return home


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory) -> Path:
    """`sdzero demo` at tiny sizes, in a folder of its own."""
    home = tmp_path_factory.mktemp("lab")
    sdzero("demo", "--out", "runs/demo", "--limit", "8", "--set", "distill.max_steps=1", *LAB_TINY, "--quiet",
           cwd=home)
    return home


# ------------------------------------------------------------------------------------------
# Every command as the README and the docs show it


@pytest.mark.slow
def test_run_and_the_stages_on_a_local_model_and_file(user):
    done = sdzero("run", "--config", "my_run.yaml", "--out", "runs/mine", "--quiet", cwd=user)
    report = json.loads((user / "runs" / "mine" / "report.json").read_text())
    assert set(report["accuracy"]) == {"base", "srt", "sdzero"} and "wrote runs/mine/report.json" in done.stdout

    # stage by stage, as the README lists them, into another run directory
    sdzero("collect", "--config", "my_run.yaml", "--out", "runs/stages", "--quiet", cwd=user)
    sdzero("srt", "--config", "my_run.yaml", "--out", "runs/stages", "--quiet", cwd=user)
    sdzero("distill", "--config", "my_run.yaml", "--out", "runs/stages", "--quiet", cwd=user)
    done = sdzero("eval", "--config", "my_run.yaml", "--model", "runs/stages/sdzero", "--out", "runs/stages/eval",
                  "--quiet", cwd=user)
    assert json.loads(done.stdout)["k"] == 2
    assert (user / "runs" / "stages" / "eval" / "samples.jsonl").read_text().count("\n") == 4 * 2
    # resuming a finished stage, and the other documented flags
    sdzero("srt", "--config", "my_run.yaml", "--out", "runs/stages", "--resume", "--quiet", cwd=user)
    sdzero("distill", "--config", "my_run.yaml", "--out", "runs/stages", "--max-steps", "3", "--resume", "--quiet",
           cwd=user)
    steps = [json.loads(line)["step"] for line in
             (user / "runs" / "stages" / "sdzero" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3
    sdzero("distill", "--config", "my_run.yaml", "--out", "runs/teacher", "--model", "runs/stages/srt",
           "--teacher", "runs/mine/srt", "--max-steps", "1", "--quiet", cwd=user)
    done = sdzero("eval", "--config", "my_run.yaml", "--model", "runs/stages/sdzero", "--revise", "--k", "1",
                  "--n", "2", "--quiet", cwd=user)
    assert json.loads(done.stdout)["revise"]["n_answers"] == 2 * 2  # eval.revise_k first answers per problem
    done = sdzero("eval", "--config", "my_run.yaml", "--model", "tiny", "--data", "problems.jsonl", "--task",
                  "tiny:even_length", "--max-new-tokens", "6", "--n", "2", "--k", "1", "--quiet", cwd=user)
    assert json.loads(done.stdout)["n_problems"] == 2

    # inspect pairs the own-data evaluation samples with their problems through the data
    done = sdzero("inspect", "--run", "runs/mine", "--n", "4", "--quiet", cwd=user)
    assert (user / "runs" / "mine" / "inspect" / "index.html").exists() and "report:" in done.stdout
    sdzero("inspect", "--run", "runs/mine", "--student", "base", "--teacher", "srt", "--n", "4",
           "--out", "runs/mine/inspect_base", "--quiet", cwd=user)


@pytest.mark.slow
def test_a_hub_id_loads_from_the_hub_cache_without_a_network(user):
    # A download cannot happen here: the tiny model is laid out as the hub client caches a repository.
    cache = user / "hub_cache"
    snapshot = cache / "models--someone--tiny" / "snapshots" / "0123abc"
    shutil.copytree(user / "tiny", snapshot)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("0123abc")
    done = sdzero("eval", "--config", "my_run.yaml", "--model", "someone/tiny", "--n", "2", "--k", "1", "--quiet",
                  cwd=user, env={"HF_HUB_CACHE": str(cache)})
    assert json.loads(done.stdout)["n_problems"] == 2
    done = sdzero("eval", "--config", "my_run.yaml", "--model", "someone/other", "--quiet", cwd=user,
                  env={"HF_HUB_CACHE": str(cache)}, expect=2)
    assert "model 'someone/other' is neither a local folder nor in the hub cache" in done.stderr


@pytest.mark.slow
def test_demo_the_quickstart_stages_and_the_lab_tools(lab_run):
    done = sdzero("demo", "--out", "runs/demo", "--self-evolve", "--limit", "8", "--set", "evolve.max_steps=2",
                  "--set", "evolve.eval_every=1", *LAB_TINY, "--quiet", cwd=lab_run)
    assert (lab_run / "runs" / "demo" / "evolve" / "report.json").exists() and "frozen" in done.stdout
    sdzero("inspect", "--run", "runs/demo", "--n", "8", "--quiet", cwd=lab_run)
    done = sdzero("lab", "errors", "runs/demo/eval/sdzero.jsonl", cwd=lab_run)
    assert "answers" in done.stdout and "carry slip" in done.stdout
    # docs/signal.md: the base model by name, and Phase 2 with teacher sync from a run's SRT model
    sdzero("eval", "--model", "lab", "--k", "1", "--n", "4", "--revise", "--out", "ev/base", *LAB_TINY, "--quiet",
           cwd=lab_run)
    assert (lab_run / "ev" / "base" / "revise.jsonl").exists()
    sdzero("distill", "--out", "runs/sync", "--seed", "1", "--model", "runs/demo/srt", "--max-steps", "2",
           "--set", "distill.sync_every=1", *LAB_TINY, "--quiet", cwd=lab_run)
    done = sdzero("lab", "problems", "--n", "2", "--split", "train", cwd=lab_run)
    assert done.stdout.count("Answer:") == 2

    # docs/quickstart.md, "The stages one by one" (the same flags; fewer problems and shorter answers)
    sdzero("collect", "--out", "runs/try", "--limit", "8", *LAB_TINY, "--quiet", cwd=lab_run)
    sdzero("srt", "--out", "runs/try", "--limit", "8", "--set", "srt.epochs=1", *LAB_TINY, "--quiet", cwd=lab_run)
    sdzero("distill", "--out", "runs/try", "--limit", "8", "--max-steps", "2", *LAB_TINY, "--quiet", cwd=lab_run)
    done = sdzero("eval", "--model", "runs/try/sdzero", "--n", "8", "--k", "4", *LAB_TINY, "--quiet", cwd=lab_run)
    assert json.loads(done.stdout)["k"] == 4
    assert sdzero("--help", cwd=lab_run).stdout.startswith("usage: sdzero")


# ------------------------------------------------------------------------------------------
# The settings a command uses without --config, and the line that says which


@pytest.mark.slow
def test_each_command_says_which_settings_it_used(user, sdzero_cache):
    # distill prints its settings line, then refuses a teacher context past the model's positions: cheap and
    # enough to see which settings were chosen (the refusal stays one line on stderr)
    past = ["--out", "runs/new", "--set", "distill.teacher_max_length=9000"]
    done = sdzero("distill", "--model", "lab", *past, cwd=user, expect=2)
    assert done.stdout.startswith("settings: the lab demo's (") and done.stdout.rstrip().endswith("demo.yaml)")
    done = sdzero("distill", "--model", "tiny", *past, cwd=user, expect=2)
    assert done.stdout == "settings: the paper's defaults\n"
    done = sdzero("distill", "--model", "tiny", "--config", "my_run.yaml", *past, cwd=user, expect=2)
    assert done.stdout == "settings: my_run.yaml\n"
    # `demo --model X` runs on X's settings, not the lab demo's
    done = sdzero("demo", "--model", "tiny", "--out", "runs/new", "--set", "distill.teacher_max_length=9000",
                  cwd=user, expect=2)
    assert done.stdout == "settings: the paper's defaults\n"
    # eval keeps stdout for its report: the line goes to stderr, once the model has loaded
    done = sdzero("eval", "--model", "tiny", "--n", "2", "--k", "1", "--max-new-tokens", "4", "--quiet", cwd=user)
    assert json.loads(done.stdout)["n_problems"] == 2 and "settings: the paper's defaults" in done.stderr
    assert not (user / "runs" / "new").exists()


@pytest.mark.slow
def test_a_registered_real_model_gets_its_preset(user, smollm2_folder, sdzero_cache):
    done = sdzero("distill", "--model", "smollm2-135m-instruct", "--out", "runs/new", "--set",
                  "distill.teacher_max_length=9000", cwd=user, expect=2, env={"SDZERO_CACHE": str(sdzero_cache)})
    assert done.stdout.startswith("settings: preset smollm2-135m-instruct (")
    assert "distill.teacher_max_length=9000 is past the teacher's 8192 positions" in done.stderr


@pytest.mark.slow
def test_sets_larger_than_the_data_say_how_to_use_limit(user):
    done = sdzero("collect", "--model", "tiny", "--data", "problems.jsonl", "--task", "tiny:even_length",
                  "--out", "runs/hint", cwd=user, expect=2)
    # the paper's defaults (6000 + 9000 + ...) on a 60-row file
    assert "the problem pool has 60 problems; requested n_phase1=6000 + n_phase2=9000 + " in done.stderr
    assert done.stderr.rstrip().endswith("; pass --limit N to use at most N problems per set, or lower n_phase1 / "
                                         "n_phase2 / eval.n_problems")


@pytest.mark.slow
def test_a_prompt_past_the_models_positions_is_refused_in_collection_phase2_and_evaluation(user, tmp_path):
    rows = [json.loads(line) for line in (user / "problems.jsonl").read_text().splitlines()]
    long_rows = [{**row, "question": row["question"] + " Think." * 400} for row in rows[:30]]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(row) + "\n" for row in long_rows))
    data = ["--config", "my_run.yaml", "--data", str(tmp_path / "long.jsonl"), "--limit", "4"]
    run = tmp_path / "run"
    done = sdzero("collect", *data, "--out", run, cwd=user, expect=2)
    assert "N1 problem 'q" in done.stderr and "positions (no room for an answer)" in done.stderr
    assert "the model has 512 positions" in done.stderr
    done = sdzero("distill", *data, "--model", "tiny", "--out", tmp_path / "run2", cwd=user, expect=2)
    assert "N2 problem 'q" in done.stderr and "the model has 512 positions" in done.stderr
    done = sdzero("eval", *data, "--model", "tiny", cwd=user, expect=2)
    assert "held-out problem 'q" in done.stderr and "the model has 512 positions" in done.stderr
    done = sdzero("run", *data, "--out", tmp_path / "run3", cwd=user, expect=2)
    assert "problem 'q" in done.stderr and "the model has 512 positions" in done.stderr
    assert not (run / "phase1").exists() and not (tmp_path / "run3" / "phase1").exists()


# ------------------------------------------------------------------------------------------
# Error paths: exit 2, one line, no traceback. A few go through the console script; the rest go through
# main() in this process (the script calls nothing else), which spares a Python start-up per case.


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["srt", "--out", "runs/new"], "runs/new/phase1/revisions.jsonl not found; run `sdzero collect --out runs/new`"),
    # a hub id with no network and no cache (HF_HUB_OFFLINE is read when huggingface_hub is imported)
    (["eval", "--model", "nobody/nothing"], "neither a local folder nor in the hub cache"),
    (["demo", "--set", "srt.lr=fast"], "--set srt.lr=fast: srt.lr: expected float"),
])
def test_the_script_refuses_in_one_line(tmp_path, args, message):
    (tmp_path / "runs").mkdir()  # so runs/... reads as a local path, not as a hub id "owner/name"
    done = sdzero(*args, cwd=tmp_path, expect=2)
    assert message in done.stderr
    assert not (tmp_path / "runs" / "new").exists(), "a refused command must not start the run directory"


@pytest.mark.parametrize("args, message", [
    (["demo", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["demo", "--seed", "one"], "invalid int value: 'one'"),
    (["lab", "pretrain", "--out", "p", "--steps", "0"], "--steps must be >= 1"),
    # stages out of order, in a relative run directory (what --out gives)
    (["distill", "--out", "runs/new"], "runs/new/srt holds no SRT model; run `sdzero srt --out runs/new` first"),
    (["inspect", "--run", "runs/new"], "run folder not found: runs/new"),
    # missing model folders, relative and absolute
    (["eval", "--model", "runs/nothere"], "model folder not found: runs/nothere"),
    (["eval", "--model", "/nonexistent/folder"], "model folder not found: /nonexistent/folder"),
    (["eval", "--model", "runs/new/srt"], "run `sdzero srt --out runs/new` first"),
    # bad values, refused when the config is read
    (["demo", "--set", "srt.grad_clip=-1"], "srt.grad_clip must be > 0"),
    (["demo", "--set", "distill.grad_clip=0"], "distill.grad_clip must be > 0"),
    (["demo", "--set", "srt.batch_size=0"], "srt.batch_size must be >= 1"),
    (["demo", "--set", "srt.epochs=0"], "srt.epochs must be >= 1"),
    (["demo", "--set", "collect.chunk_size=0"], "collect.chunk_size must be >= 1"),
    (["demo", "--set", "lora.target_modules=5"], "--set lora.target_modules=5: lora.target_modules: expected"),
    (["demo", "--set", "distill.mixed_weight=7"], "distill.mixed_weight must be in [0, 1]"),
    (["demo", "--set", "eval.n_problems=0"], "eval.n_problems must be >= 1"),
    (["demo", "--set", "lora.enabled=true", "--set", "distill.sync_every=2"], "not available with lora.enabled"),
    (["demo", "--set", "dtype=float16"], "dtype float16 cannot train all weights"),
    (["demo", "--set", "sampling.backend=vllm"], "sampling.backend='vllm' needs vLLM"),
    (["demo", "--set", "data.eval_path=held_out.jsonl"], "data.eval_path and data.eval_split need data.path"),
    (["demo", "--limit", "0"], "--limit must be >= 1"),
    # a teacher context past the model's positions (lab: 512)
    (["demo", "--out", "runs/new", "--model", "lab", "--set", "distill.teacher_max_length=1024"],
     "distill.teacher_max_length=1024 is past the teacher's 512 positions"),
    (["distill", "--out", "runs/new", "--model", "lab", "--set", "distill.teacher_max_length=513"],
     "distill.teacher_max_length=513 is past the teacher's 512 positions"),
    (["demo", "--config", "nope.yaml"], "config file not found: nope.yaml"),
    (["collect", "--out", "runs/new", "--data", "nothere.jsonl", "--task", "math"], "data file not found: nothere"),
    (["compare", "--out", "runs/cmp", "--methods", "sdzero,ppo"], "unknown method(s) ppo"),
])
def test_refused_in_one_line(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SDZERO_DEBUG", raising=False)
    try:
        code, err = main_in_process(args, capsys)
    except SystemExit as exit:  # argparse's own errors leave through sys.exit, as in the script
        code, err = exit.code, capsys.readouterr().err
    assert code == USAGE_ERROR, err
    assert message in err
    assert_one_line(err)
    assert not (tmp_path / "runs" / "new").exists(), "a refused command must not start the run directory"


@pytest.mark.slow
def test_refusals_that_need_the_models_come_before_any_file_is_touched(user):
    run = user / "runs" / "refusals"
    sdzero("collect", "--config", "my_run.yaml", "--out", run, "--quiet", cwd=user)
    sdzero("srt", "--config", "my_run.yaml", "--out", run, "--quiet", cwd=user)
    sdzero("distill", "--config", "my_run.yaml", "--out", run, "--quiet", cwd=user)
    metrics = (run / "sdzero" / "metrics.jsonl").read_text()

    done = sdzero("distill", "--config", "my_run.yaml", "--out", run, "--set", "distill.teacher_max_length=10",
                  cwd=user, expect=2)
    assert "distill.teacher_max_length=10 is too short for any sample" in done.stderr
    # a teacher whose tokenizer differs from the student's cannot score the student's ids
    build_tiny_model(user / "other_vocab", vocab_size=280)
    done = sdzero("distill", "--config", "my_run.yaml", "--out", run, "--teacher", "other_vocab", cwd=user, expect=2)
    assert "uses another tokenizer than the student" in done.stderr
    assert (run / "sdzero" / "metrics.jsonl").read_text() == metrics, "a refused distill changed the last run's log"

    # a diverging SRT stops with the likely causes and saves no model
    diverged = user / "runs" / "diverged"
    shutil.copytree(run / "phase1", diverged / "phase1")
    done = sdzero("srt", "--config", "my_run.yaml", "--out", diverged, "--set", "srt.lr=1e30", "--set", "srt.epochs=3",
                  "--quiet", cwd=user, expect=2)
    assert "is nan" in done.stderr and "learning rate too high" in done.stderr
    assert not (diverged / "srt" / "config.json").exists()


@pytest.mark.slow
def test_a_stage_with_nothing_to_train_exits_3_so_a_chain_stops(tmp_path, user):
    # math-verify never accepts a random model's text: no first answer is right, no revision is kept
    config = tmp_path / "math.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load((user / "my_run.yaml").read_text()), "task": "math",
                                      "model": str(user / "tiny"), "data": {"path": str(user / "problems.jsonl")}}))
    done = sdzero("collect", "--config", config, "--out", "run", "--quiet", cwd=tmp_path, expect=3)
    assert "no verified revision was kept" in done.stderr
    done = sdzero("srt", "--config", config, "--out", "run", "--quiet", cwd=tmp_path, expect=3)
    assert "nothing to train on" in done.stderr
    chain = subprocess.run(f"{SDZERO} srt --config {config} --out run --quiet && echo went-on", shell=True,
                           cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert chain.returncode == 3 and "went-on" not in chain.stdout


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_saying_how_to_go_on(tmp_path):
    signals = tmp_path / "signals"
    fifo = hold_at(signals, "collect-chunk-1")  # Ctrl-C once collection has written its first chunk
    process = subprocess.Popen([SDZERO, "collect", "--out", "runs/c", "--set", "collect.chunk_size=4", "--quiet"],
                               cwd=tmp_path,
                               env={**ENV, "SDZERO_TEST_SIGNAL_DIR": str(signals)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert stop_at(process, fifo, signal.SIGINT) == 130
    err = process.communicate(timeout=120)[1]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["sdzero collect: interrupted; re-run sdzero collect --out runs/c --set collect.chunk_size=4 "
                     "--quiet to go on with the problems not collected yet"]


# ------------------------------------------------------------------------------------------
# What main() turns into one line and exit 2 (a refusal), and what it lets through (anything else)


def main_in_process(argv: list, capsys) -> tuple[int, str]:
    """`sdzero ARGV` through sdzero.cli.main in this process: its exit code and its stderr."""
    capsys.readouterr()
    code = main([*map(str, argv)])
    return code, capsys.readouterr().err


def test_a_refusal_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SDZERO_DEBUG", raising=False)
    code, err = main_in_process(["demo", "--out", tmp_path / "run", "--set", "srt.epochs=0"], capsys)
    assert code == USAGE_ERROR == 2
    assert len(err.splitlines()) == 1 and err.startswith("sdzero demo: error: ") and "srt.epochs must be >= 1" in err


def test_sdzero_debug_shows_the_traceback_of_a_refusal_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDZERO_DEBUG", "1")
    code, err = main_in_process(["demo", "--out", tmp_path / "run", "--set", "srt.epochs=0"], capsys)
    assert code == USAGE_ERROR
    lines = err.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "cmd_demo" in err
    assert any(line.startswith("sdzero.errors.Refusal: ") for line in lines)
    assert lines[-1].startswith("sdzero demo: error: ") and "srt.epochs must be >= 1" in lines[-1]


@pytest.mark.parametrize("bug", [KeyError("held_out"), ValueError("a library's own ValueError")])
def test_an_error_that_is_not_a_refusal_keeps_its_traceback(monkeypatch, bug):
    # A stand-in for a bug: the command function is replaced by one that fails with an error of our code
    # (KeyError) or of a library (a plain ValueError, which is not a Refusal). Neither may become exit 2.
    def command_with_a_bug(args):
        raise bug

    monkeypatch.setitem(COMMANDS, "models", command_with_a_bug)
    with pytest.raises(type(bug)) as raised:
        main(["models"])
    assert raised.value is bug


def write_bytes(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# (files to write, the command, what its one line must say). Each is an error a library raises on a user's
# bad file or setting; sdzero names the file or setting in a refusal.
BROKEN_INPUTS = {
    "config not UTF-8": ({"run.yaml": b"seed: 1\nmodel: \xff\n"}, ["demo", "--config", "{dir}/run.yaml"],
                         "{dir}/run.yaml: not UTF-8 text"),
    "config not YAML": ({"run.yaml": b"seed: 1\nsrt:\n  lr: [1\n"}, ["demo", "--config", "{dir}/run.yaml"],
                        "{dir}/run.yaml: not valid YAML (line 4, column 1: expected ',' or ']'"),
    "--set not YAML": ({}, ["demo", "--set", "srt.lr=[1"], "--set srt.lr=[1: the value is not valid YAML (line 1, "),
    "config a folder": ({"folder/x": b""}, ["demo", "--config", "{dir}/folder"], "{dir}/folder is not a file"),
    "run.json broken": ({"run/run.json": b"{"}, ["collect", "--out", "{dir}/run"],
                        "{dir}/run/run.json:1: not valid JSON"),
    "split.json broken": ({"run/split.json": b"[", "run/run.json": b"{}"}, ["eval", "--run", "{dir}/run"],
                          "{dir}/run/split.json:1: not valid JSON"),
    "samples not found": ({}, ["lab", "errors", "{dir}/nothere.jsonl"],
                          "evaluation samples not found: {dir}/nothere.jsonl"),
    "samples not UTF-8": ({"samples.jsonl": b"\xff\n"}, ["lab", "errors", "{dir}/samples.jsonl"],
                          "{dir}/samples.jsonl: not UTF-8 text"),
    "data JSONL not UTF-8": ({"data.jsonl": b'{"question": "\xff"}\n'}, ["check", "--data", "{dir}/data.jsonl",
                             "--task", "math", "--solution-field", "question"], "{dir}/data.jsonl: not UTF-8 text"),
    "data JSON not UTF-8": ({"data.json": b'[{"question": "\xff"}]'}, ["check", "--data", "{dir}/data.json",
                            "--task", "math", "--solution-field", "question"], "{dir}/data.json: not UTF-8 text"),
    "data not Parquet": ({"data.parquet": b"PAR1 cut short"}, ["check", "--data", "{dir}/data.parquet", "--task",
                         "math", "--solution-field", "question"], "{dir}/data.parquet: not a readable Parquet file"),
    "model config broken": ({"junk/config.json": b"{"}, ["eval", "--model", "{dir}/junk"],
                            "model '{dir}/junk' could not be loaded from {dir}/junk: "),
    "model config unknown": ({"junk/config.json": b"{}"}, ["eval", "--model", "{dir}/junk"],
                             "model '{dir}/junk' could not be loaded from {dir}/junk: "),
}


@pytest.mark.parametrize("files, argv, message", BROKEN_INPUTS.values(), ids=BROKEN_INPUTS.keys())
def test_a_broken_input_file_is_a_refusal_naming_it(tmp_path, capsys, files, argv, message):
    for name, content in files.items():
        write_bytes(tmp_path / name, content)
    code, err = main_in_process([arg.format(dir=tmp_path) for arg in argv], capsys)
    assert code == USAGE_ERROR, err
    assert len(err.splitlines()) == 1 and message.format(dir=tmp_path) in err, err


def test_lora_modules_the_model_lacks_are_a_refusal(user, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(user)
    code, err = main_in_process(["distill", "--config", "my_run.yaml", "--out", tmp_path / "run", "--model", "tiny",
                                 "--set", "lora.enabled=true", "--set", "lora.target_modules=[nosuch]", "--quiet"],
                                capsys)
    assert code == USAGE_ERROR, err
    assert len(err.splitlines()) == 1 and "lora: Target modules {'nosuch'} not found in the base model" in err


def test_a_file_that_is_not_gguf_is_a_refusal(tmp_path, capsys, sdzero_cache):
    pytest.importorskip("gguf")
    fake = write_bytes(tmp_path / "model.gguf", b"GGUF" + bytes(4))
    code, err = main_in_process(["models", fake, "--out", tmp_path / "plain"], capsys)
    assert code == USAGE_ERROR, err
    assert len(err.splitlines()) == 1 and f"{fake} could not be read as a GGUF file" in err
