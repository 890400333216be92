"""A run directory has one identity: the same directory re-used with a changed setting is refused in one
line naming it (or, with --restart, the stale outputs move aside), every command uses the recorded split,
and a stale checkpoint is never resumed. On a tiny local model and a local JSONL, through `sdzero.cli.main`."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdzero.modeling import load_tokenizer
from sdzero.rundir import begin_stage, model_fingerprint
from sdzero.srt import check_tuples
from tiny import build_tiny_model, hold_at, refused, sdzero, stop_at, tiny_home

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """Two tiny models with different tokenizers, 60 problems, and a config for them."""
    home = tiny_home(tmp_path_factory.mktemp("rundir"), 60, {
        "n_phase1": 12, "n_phase2": 12, "sampling": {"max_new_tokens": 12},
        "srt": {"epochs": 1, "batch_size": 4, "lr": 1e-3},
        "distill": {"prompts_per_step": 4, "micro_batch_size": 2, "max_steps": 2, "lr": 1e-3, "warmup_steps": 1,
                    "save_every": 1},
        "eval": {"k": 2, "n_problems": 10, "curve_problems": 2, "curve_k": 1},
    })
    build_tiny_model(home / "other", vocab_size=280)
    return home


@pytest.fixture(scope="module")
def staged(home, tmp_path_factory) -> Path:
    """collect (--limit 8), srt and distill into one run directory."""
    run = home / "runs" / "staged"
    assert sdzero(home, "collect", "--out", run, "--limit", "8") == 0
    assert sdzero(home, "srt", "--out", run) == 0
    assert sdzero(home, "distill", "--out", run) == 0
    return run


@pytest.mark.slow
def test_the_first_command_records_the_run(staged):
    record = json.loads((staged / "run.json").read_text())
    assert record["limit"] == 8 and record["identity"]["n_phase1"] == 8
    assert record["base_model"]["fingerprint"] == model_fingerprint(str(staged.parent.parent / "tiny"))
    assert (staged / "config.yaml").exists() and (staged / "split.json").exists()
    for stage in ("phase1", "srt", "sdzero"):
        assert (staged / stage / "settings.json").exists(), stage
    # the later commands used the recorded --limit: N2 has the 8 problems of the record
    split = json.loads((staged / "split.json").read_text())
    assert len(split["n_phase2"]) == 8


@pytest.mark.slow
@pytest.mark.parametrize("args, named", [
    (["collect", "--seed", "3"], "seed: 0 -> 3"),
    (["distill", "--seed", "3"], "seed: 0 -> 3"),
    (["collect", "--limit", "6"], "n_phase1: 8 -> 6"),
    (["srt", "--set", "control_preset=qwen"], "control_phrases."),
    (["collect", "--set", "collect.revisions_per_answer=1"], "collect.revisions_per_answer: 3 -> 1"),
    (["srt", "--set", "srt.lr=0.01"], "srt.lr: 0.001 -> 0.01"),
    (["distill", "--set", "distill.lr=0.01"], "distill.lr: 0.001 -> 0.01"),
    (["distill", "--resume", "--set", "distill.lr=0.01"], "distill.lr: 0.001 -> 0.01"),
    (["distill", "--set", "sampling.temperature=0.5"], "sampling.temperature: 1.0 -> 0.5"),
])
def test_a_changed_setting_in_the_same_directory_is_refused_naming_it(home, staged, capsys, args, named):
    before = {p: p.read_bytes() for p in staged.rglob("*") if p.is_file()}
    err = refused(home, capsys, args[0], "--out", staged, *args[1:])
    assert named in err and "--restart" in err
    after = {p: p.read_bytes() for p in staged.rglob("*") if p.is_file()}
    assert after == before, "a refused command changed the run directory"


@pytest.mark.slow
def test_another_base_model_is_refused(home, staged, capsys):
    err = refused(home, capsys, "collect", "--out", staged, "--model", home / "other")
    assert "has the base model" in err and str(home / "other") in err


@pytest.mark.slow
def test_restart_moves_the_stale_stage_and_what_it_feeds_aside(home, staged, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(staged, run)
    old_srt = (run / "srt" / "model.safetensors").read_bytes()
    assert sdzero(home, "srt", "--out", run, "--set", "srt.lr=0.01", "--restart") == 0
    stale = next((run / "stale").iterdir())
    assert (stale / "srt" / "model.safetensors").read_bytes() == old_srt
    assert (stale / "sdzero").is_dir() and not (run / "sdzero").exists()
    assert json.loads((run / "srt" / "settings.json").read_text())["srt"]["lr"] == 0.01
    # a new seed is a new run: everything of the old one moves aside, and the new split is recorded
    assert sdzero(home, "collect", "--out", run, "--seed", "1", "--restart") == 0
    assert json.loads((run / "split.json").read_text())["seed"] == 1
    attempts = [json.loads(line)["id"] for line in (run / "phase1" / "attempts.jsonl").read_text().splitlines()]
    assert sorted(attempts) == sorted(json.loads((run / "split.json").read_text())["n_phase1"])


@pytest.mark.slow
def test_eval_uses_the_recorded_held_out_set(home, staged, capsys):
    split = json.loads((staged / "split.json").read_text())
    assert sdzero(home, "eval", "--model", staged / "sdzero", "--out", staged / "ev") == 0
    ids = {json.loads(line)["id"] for line in (staged / "ev" / "samples.jsonl").read_text().splitlines()}
    assert ids == set(split["held_out"]) and not ids & set(split["n_phase1"] + split["n_phase2"])
    assert sdzero(home, "eval", "--model", staged / "sdzero", "--n", "3", "--out", staged / "ev3") == 0
    ids = [json.loads(line)["id"] for line in (staged / "ev3" / "samples.jsonl").read_text().splitlines()]
    assert list(dict.fromkeys(ids)) == split["held_out"][:3]
    err = refused(home, capsys, "eval", "--model", staged / "sdzero", "--n", "20")
    assert "held-out set of" in err and "has 8 problems" in err
    err = refused(home, capsys, "eval", "--model", staged / "sdzero", "--out", staged / "ev", "--k", "1")
    assert "k: 2 -> 1" in err
    err = refused(home, capsys, "eval", "--model", staged / "sdzero", "--seed", "2")
    assert "seed: 0 -> 2" in err


@pytest.mark.slow
def test_a_stage_started_again_leaves_no_old_checkpoint_to_resume(staged, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(staged, run)
    settings = json.loads((run / "sdzero" / "settings.json").read_text())
    assert (run / "sdzero" / "checkpoint" / "state.json").exists()
    begin_stage(run, "sdzero", settings, resume=True)
    assert (run / "sdzero" / "checkpoint").exists(), "--resume keeps the checkpoint of the same settings"
    begin_stage(run, "sdzero", settings)
    assert not (run / "sdzero" / "checkpoint").exists(), "a fresh start must not leave the old checkpoint behind"
    # a checkpoint whose settings are unknown is never resumed
    (run / "sdzero" / "settings.json").unlink()
    (run / "sdzero" / "checkpoint").mkdir()
    with pytest.raises(ValueError, match="cannot be resumed safely"):
        begin_stage(run, "sdzero", settings, resume=True)


@pytest.mark.slow
def test_distill_may_run_on_past_its_planned_end_with_resume(home, staged, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(staged, run)
    assert sdzero(home, "distill", "--out", run, "--max-steps", "3", "--resume") == 0
    steps = [json.loads(line)["step"] for line in (run / "sdzero" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_srt_refuses_tuples_of_another_tokenizer(home, staged):
    path = staged / "phase1" / "revisions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows and all(row["tokenizer"] for row in rows)
    check_tuples(rows, load_tokenizer(str(home / "tiny")), path)
    with pytest.raises(ValueError, match=f"{path}:1: the tuple was tokenized by another tokenizer"):
        check_tuples(rows, load_tokenizer(str(home / "other")), path)
    # tuples without a recorded tokenizer (older files) are still checked against the vocabulary
    unmarked = [{k: v for k, v in row.items() if k != "tokenizer"} for row in rows]
    unmarked[0]["init_ids"], unmarked[0]["revised_ids"] = [5], [290]
    with pytest.raises(ValueError, match="token id 290 is outside the model's vocabulary of 280"):
        check_tuples(unmarked, load_tokenizer(str(home / "other")), path)


@pytest.mark.slow
def test_two_processes_collect_each_problem_once_and_save_and_print_once(home, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29523", "-m", "sdzero.cli"]
    outputs = {}
    for command in ("collect", "srt", "distill"):
        done = subprocess.run([*launch, command, "--out", str(run), "--config", str(home / "run.yaml"), "--quiet"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[command] = done.stdout
    split = json.loads((run / "split.json").read_text())
    ids = [json.loads(line)["id"] for line in (run / "phase1" / "attempts.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(split["n_phase1"]), "every N1 problem collected exactly once"
    assert outputs["collect"].count('"problems": 12') == 1
    assert outputs["srt"].count(f"saved {run / 'srt'}") == 1
    assert outputs["distill"].count("saved") == 1
    assert (run / "sdzero" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_killed_run_resumed_at_every_stage_ends_with_the_report_of_an_uninterrupted_one(home, tmp_path):
    settings = yaml.safe_load((home / "run.yaml").read_text())
    settings["collect"] = {"chunk_size": 2}
    settings["srt"].update(epochs=6, save_every=1)
    settings["distill"].update(max_steps=6, eval_every=2)
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def command(out: Path, *extra) -> list[str]:
        return [sys.executable, "-m", "sdzero.cli", "run", "--out", str(out), "--config", str(config), "--quiet",
                *extra]

    subprocess.run(command(tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=600)
    run, signals = tmp_path / "killed", tmp_path / "signals"
    # inside collection (1 chunk of 6 written), inside SRT and inside Phase 2 (each at its first checkpoint)
    for i, point in enumerate(["collect-chunk-1", "srt-step-1", "phase2-step-1"]):
        fifo = hold_at(signals, point)
        process = subprocess.Popen(command(run, *(["--resume"] if i else [])),
                                   env=dict(env, SDZERO_TEST_SIGNAL_DIR=str(signals)),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert stop_at(process, fifo) == -signal.SIGKILL, f"the run ended before {point}"
    subprocess.run(command(run, "--resume"), env=env, check=True, capture_output=True, timeout=600)

    whole, resumed = (json.loads((out / "report.json").read_text()) for out in (tmp_path / "whole", run))
    for key in ("accuracy", "mean_length", "pass@k", "revise", "phase1", "phase2_curve"):
        assert resumed[key] == whole[key], key
    assert (run / "sdzero" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "sdzero" / "model.safetensors").read_bytes()


# 5. The system turn the run records is the one its prompts carry


@pytest.mark.slow
def test_run_json_records_the_system_turn_the_template_adds(home, smollm2_folder, staged):
    from sdzero.config import load_config
    from sdzero.rundir import run_identity

    smollm = load_config(None, [f"model={smollm2_folder}"])
    assert run_identity(smollm)["system_prompt"] == ("You are a helpful AI assistant named SmolLM, trained by "
                                                     "Hugging Face")
    # an empty system prompt is the same run as none, and a stated one is another run
    assert run_identity(load_config(None, [f"model={smollm2_folder}", "system_prompt=''"])) == run_identity(smollm)
    assert run_identity(load_config(None, [f"model={smollm2_folder}", "system_prompt=Be brief."]))[
        "system_prompt"] == "Be brief."
    # the lab's template and the tiny model's add none: null
    assert run_identity(load_config(None, ["model=lab"]))["system_prompt"] is None
    assert json.loads((staged / "run.json").read_text())["identity"]["system_prompt"] is None
    assert sdzero(home, "eval", "--model", staged / "sdzero", "--set", "system_prompt=''", "--n", "2",
                  "--out", staged / "ev_empty_system") == 0
