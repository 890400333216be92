"""The stage runner (sdzero.stages): what a run directory's stages record, save and reuse, what compare's method
folders leave out, and the Phase 2 prompt ids compare bills. On a tiny local model and a local JSONL."""

import json
from pathlib import Path

import pytest

from sdzero.config import load_config
from sdzero.generation import make_generator
from sdzero.stages import (Stages, begin_collect, load_run_model, open_stages, phase2_prompt_ids, problem_sets,
                           run_collect, run_phase2, run_srt)
from tiny import tiny_home


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tiny_home(tmp_path_factory.mktemp("stages"), 40, {
        "n_phase1": 8, "n_phase2": 5, "sampling": {"max_new_tokens": 12},
        "srt": {"epochs": 1, "batch_size": 4, "lr": 1e-3},
        "distill": {"prompts_per_step": 4, "micro_batch_size": 2, "max_steps": 3, "lr": 1e-3, "warmup_steps": 1,
                    "rollouts_every": 1, "eval_every": None},
        "eval": {"k": 1, "n_problems": 4, "curve_problems": 2, "curve_k": 1},
    })


def quiet(*_):
    pass


def test_a_run_directory_records_and_saves_each_stage_and_a_resumed_run_reuses_it(home, tmp_path):
    cfg = load_config(home / "run.yaml")
    run = tmp_path / "run"
    stages = open_stages(cfg, run, progress=False, log=quiet)
    begin_collect(stages)
    model = load_run_model(cfg)[0]
    collection = run_collect(stages, make_generator(model, stages.tokenizer, cfg.sampling))
    rows = [json.loads(line) for line in (run / "phase1" / "revisions.jsonl").read_text().splitlines()]
    assert collection["kept"] == len(rows) > 0
    summary = run_srt(stages, rows, model)[1]
    for stage in ("phase1", "srt"):
        assert (run / stage / "settings.json").exists(), stage
    assert (run / "srt" / "config.json").exists() and (run / "srt" / "README.md").exists()
    assert json.loads((run / "srt" / "summary.json").read_text())["steps"] == summary["steps"] > 0

    # `run --resume`: the finished stage is loaded and evaluated again, not trained again
    metrics = (run / "srt" / "metrics.jsonl").read_text()
    evaluated = []
    resumed = open_stages(cfg, run, progress=False, log=quiet, resume=True, reuse_done=True,
                          evaluate_model=lambda stage, trained: evaluated.append((stage, trained)))
    trained, reused = run_srt(resumed, rows)
    assert reused == json.loads((run / "srt" / "summary.json").read_text())
    assert (run / "srt" / "metrics.jsonl").read_text() == metrics
    assert evaluated == [("srt", trained)]


def test_compare_folders_keep_no_model_and_phase2_bills_the_prompts_it_drew(home, tmp_path):
    cfg = load_config(home / "run.yaml")
    sets = problem_sets(cfg)
    out = tmp_path / "seed0" / "phase2"
    stages = Stages(cfg, out, sets=sets, progress=False, seeded=False, folders={"sdzero": "phase2"}, log=quiet)
    summary = run_phase2(stages, load_run_model(cfg)[0], curve_fn=lambda student: 0.0)[1]
    assert summary["generations"] == cfg.distill.max_steps * cfg.distill.prompts_per_step
    rollouts = [json.loads(line) for line in (out / "phase2" / "rollouts.jsonl").read_text().splitlines()]
    # 12 prompts drawn from 5 problems: the replayed order walks the same epochs, repeats included
    drawn = [row["id"] for row in sorted(rollouts, key=lambda row: row["step"])]
    assert phase2_prompt_ids(sets.n2, cfg.seed, len(drawn)) == drawn
    assert len(set(drawn)) == len(sets.n2) and len(drawn) > len(sets.n2)
    assert phase2_prompt_ids(sets.n2, cfg.seed + 1, len(drawn)) != drawn
    # no run directory: nothing recorded, no model saved
    assert not list(out.rglob("settings.json")) and not list(out.rglob("summary.json"))
    assert not list(out.rglob("*.safetensors"))
