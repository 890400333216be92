"""The whole pipeline on a tiny budget with the real lab model, and the command line's errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdzero.cli import main
from sdzero.config import load_config
from sdzero.pipeline import run_pipeline

TINY = ["n_phase1=48", "n_phase2=16", "sampling.max_new_tokens=120", "srt.epochs=1", "srt.batch_size=16",
        "distill.prompts_per_step=8", "distill.micro_batch_size=4", "distill.max_steps=2", "distill.eval_every=1",
        "eval.n_problems=8", "eval.k=2", "eval.curve_problems=4", "eval.curve_k=1",
        # two steps judged on 4 problems: keep-best could return the SRT weights (tested on its own)
        "distill.keep_best=false"]


@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_saves_loadable_models(tmp_path):
    from sdzero.cli import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG, TINY)
    report = run_pipeline(cfg, tmp_path, progress=False, log=lambda *_: None)
    assert set(report["accuracy"]) == {"base", "srt", "sdzero"}
    assert all(0.0 <= a <= 1.0 for a in report["accuracy"].values())
    assert report["metric"] == "avg@2" and report["k"] == 2 and report["n_eval_problems"] == 8
    assert json.loads((tmp_path / "report.json").read_text())["accuracy"] == report["accuracy"]
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    assert [h["step"] for h in report["phase2_curve"]] == [0, 1, 2]
    # generate-then-revise on the held-out problems: 8 problems x eval.revise_k first answers per stage
    assert set(report["revise"]) == {"base", "srt", "sdzero"}
    assert all(r["n_answers"] == 8 * cfg.eval.revise_k for r in report["revise"].values())
    assert (tmp_path / "eval" / "sdzero_revise.jsonl").read_text().count("\n") == 8 * cfg.eval.revise_k

    metrics = [json.loads(line) for line in (tmp_path / "sdzero" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["sdzero/kl"] >= 0 and m["sdzero/teacher_version"] == 0 for m in steps)

    # every stage's model loads back unchanged in plain transformers
    for stage in ("srt", "sdzero"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / stage)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / stage)
        assert tokenizer.chat_template
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == len(tokenizer)
    srt = AutoModelForCausalLM.from_pretrained(tmp_path / "srt")
    sdzero = AutoModelForCausalLM.from_pretrained(tmp_path / "sdzero")
    moved = any(not torch.equal(a, b) for a, b in zip(srt.parameters(), sdzero.parameters()))
    assert moved, "Phase 2 left the weights unchanged"


@pytest.mark.slow
def test_teacher_sync_every_n_steps(tmp_path, lab_model_and_tokenizer):
    import copy

    from sdzero import lab
    from sdzero.distill import DistillConfig, distill
    from sdzero.generation import SamplingConfig
    from sdzero.prompts import ControlPhrases
    from sdzero.tasks.lab import lab_reward

    student = copy.deepcopy(lab_model_and_tokenizer[0])
    tokenizer = lab_model_and_tokenizer[1]
    _, n2, _ = lab.problem_sets(1, 8, 1, seed=0)
    cfg = DistillConfig(prompts_per_step=4, micro_batch_size=4, max_steps=4, lr=1e-3, warmup_steps=1, sync_every=2)
    teacher = copy.deepcopy(student).requires_grad_(False)
    summary = distill(student, tokenizer, n2, lab_reward, ControlPhrases(), SamplingConfig(max_new_tokens=60), cfg,
                      teacher=teacher, progress=False)
    assert summary["syncs"] == [2, 4] and summary["teacher_version"] == 2
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("args, message", [
    (["--set", "distill.divergence=js"], "unknown divergence 'js'"),
    (["--set", "distill.top_k=0"], "top_k must be >= 1"),
    (["--set", "n_phase1=0"], "n_phase1 must be >= 1"),
    (["--model", "/nonexistent/checkpoint"], "model folder not found"),
    (["--set", "distill.nonsense=1"], "--set distill.nonsense=1: unknown key 'distill.nonsense'"),
    (["--set", "srt.lr=fast"], "--set srt.lr=fast: srt.lr: expected float"),
])
def test_bad_input_is_refused_in_one_line(tmp_path, capsys, args, message):
    assert main(["demo", "--out", str(tmp_path), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_config_file_and_missing_phase1_data(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["srt", "--out", str(tmp_path / "run")]) == 2
    assert "revisions.jsonl not found" in capsys.readouterr().err
