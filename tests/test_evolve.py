"""Self-evolution: frozen and synced Phase 2 from the same SRT model, on tiny settings."""

import json

import pytest

from sdzero.config import load_config
from sdzero.evolve import self_evolution
from sdzero.pipeline import save_stage


@pytest.mark.slow
def test_frozen_and_synced_runs_match_until_the_first_sync_then_differ(tmp_path, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    cfg = load_config(overrides=[
        "task=lab", "n_phase1=4", "n_phase2=16", "sampling.max_new_tokens=40", "sampling.batch_size=64",
        "distill.prompts_per_step=4", "distill.micro_batch_size=4", "distill.warmup_steps=0", "distill.lr=1e-3",
        "eval.k=1", "eval.n_problems=4", "eval.curve_problems=4", "eval.curve_k=1",
        "evolve.max_steps=3", "evolve.eval_every=1", "evolve.sync_every=1", "evolve.sync_patience=null"])
    save_stage(model, tokenizer, tmp_path / "srt", cfg, "srt")  # the lab model stands in for the SRT model
    logs = []
    report = self_evolution(cfg, tmp_path, progress=False, log=logs.append)

    assert json.loads((tmp_path / "evolve" / "report.json").read_text()) == report
    assert (tmp_path / "evolve" / "self_evolution.png").stat().st_size > 1000
    frozen, synced = report["runs"]["frozen"], report["runs"]["synced"]
    assert frozen["syncs"] == [] and synced["syncs"] == [1, 2, 3]
    assert [h["step"] for h in frozen["history"]] == [h["step"] for h in synced["history"]] == [0, 1, 2, 3]
    assert [h["teacher_version"] for h in synced["history"]] == [0, 1, 2, 3]
    assert report["gain"] == pytest.approx(synced["accuracy"] - frozen["accuracy"])

    def losses(name):
        rows = [json.loads(line) for line in (tmp_path / "evolve" / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    # same seed, same starting model: step 1 is the same in both runs; from step 2 on the synced
    # teacher is the student after step 1, and the loss changes
    frozen_loss, synced_loss = losses("frozen"), losses("synced")
    assert len(frozen_loss) == len(synced_loss) == 3
    assert frozen_loss[0] == pytest.approx(synced_loss[0], rel=1e-6)
    assert frozen_loss[1] != pytest.approx(synced_loss[1], rel=1e-4)
    assert frozen["history"][1]["accuracy"] == synced["history"][1]["accuracy"]


def test_evolve_settings_must_sync():
    with pytest.raises(ValueError, match="evolve needs evolve.sync_every or evolve.sync_patience"):
        load_config(overrides=["evolve.sync_patience=null"])
