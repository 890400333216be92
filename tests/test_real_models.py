"""Any Hugging Face causal LM with a chat template, on local data: a tiny Llama with its own BPE
tokenizer (built here), a JSONL of problems, a reward function named by import path, LoRA,
resuming after SIGKILL, and two processes under `accelerate launch`."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from sdzero.cli import main
from sdzero.config import load_config
from sdzero.pipeline import run_pipeline
from tiny import build_tiny_model, hold_at, stop_at, write_problems

TESTS = Path(__file__).parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def tiny_settings(model: Path, data: Path, **extra) -> dict:
    settings = {
        "model": str(model), "task": "tiny:even_length", "data": {"path": str(data)},
        "n_phase1": 6, "n_phase2": 8,
        "sampling": {"max_new_tokens": 12},
        "srt": {"epochs": 1, "batch_size": 4, "lr": 1e-3},
        "distill": {"prompts_per_step": 4, "micro_batch_size": 2, "max_steps": 2, "lr": 1e-3, "warmup_steps": 1},
        "eval": {"k": 2, "n_problems": 4, "curve_problems": 2, "curve_k": 1},
    }
    for key, value in extra.items():
        settings.setdefault(key, {}).update(value) if isinstance(value, dict) else settings.update({key: value})
    return settings


def write_config(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings))
    return path


def flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.slow
def test_whole_method_on_a_local_model_and_jsonl(tmp_path, tiny_model):
    data = write_problems(tmp_path / "problems.jsonl", 30)
    cfg = load_config(write_config(tmp_path / "run.yaml", tiny_settings(tiny_model, data)))
    report = run_pipeline(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    assert set(report["accuracy"]) == {"base", "srt", "sdzero"}
    assert report["phase1"]["kept"] > 0

    split = json.loads((run / "split.json").read_text())
    parts = [set(split[name]) for name in ("n_phase1", "n_phase2", "held_out")]
    assert [len(p) for p in parts] == [6, 8, 4]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert split["source"]["path"] == str(data)

    start = AutoModelForCausalLM.from_pretrained(tiny_model)
    for stage in ("srt", "sdzero"):
        loaded = AutoModelForCausalLM.from_pretrained(run / stage)
        assert type(loaded).__name__ == "LlamaForCausalLM"
        assert not torch.equal(flat_weights(loaded), flat_weights(start)), f"{stage} did not train"
        assert list((run / stage / "tensorboard").rglob("events.out.tfevents.*")), f"{stage}: no tensorboard events"
    metrics = [json.loads(line) for line in (run / "sdzero" / "metrics.jsonl").read_text().splitlines()]
    names = {"sdzero/reward", "sdzero/kl", "sdzero/kl_wrong", "sdzero/kl_right", "sdzero/response_len",
             "sdzero/teacher_version", "sdzero/truncated", "sdzero/masked_out"}
    assert all(names <= set(m) for m in metrics if "loss" in m)


@pytest.mark.slow
def test_lora_trains_adapters_only_and_the_teacher_is_the_adapter_free_model(tmp_path, tiny_model):
    from sdzero.distill import DistillConfig, distill
    from sdzero.generation import SamplingConfig
    from sdzero.modeling import LoraConfig, Teacher, load_model, prepare_for_training
    from sdzero.config import RunConfig
    from sdzero.pipeline import save_stage
    from sdzero.prompts import ControlPhrases
    from tiny import even_length

    base, tokenizer = load_model(str(tiny_model), device="cpu")
    start = flat_weights(base).clone()
    student = prepare_for_training(base, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    teacher = Teacher(student)
    assert teacher.model is None  # no second copy of the weights
    probe = torch.tensor([[5, 6, 7, 8]])
    reference = AutoModelForCausalLM.from_pretrained(tiny_model)
    problems = [{"id": str(i), "problem": f"What is {i}?", "answer": str(i)} for i in range(8)]
    distill(student, tokenizer, problems, even_length, ControlPhrases(), SamplingConfig(max_new_tokens=10),
            DistillConfig(prompts_per_step=4, micro_batch_size=4, max_steps=2, lr=5e-2, warmup_steps=1),
            teacher=teacher, progress=False)

    base_weights = {n: p for n, p in student.named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for p in base_weights.values())
    assert torch.equal(torch.cat([p.detach().flatten() for p in base_weights.values()]), start)
    lora_b = [p for n, p in student.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "the adapters did not train"
    # the teacher is the starting model exactly; the student is not
    assert torch.allclose(teacher(input_ids=probe).logits, reference(input_ids=probe).logits, atol=1e-6)
    assert not torch.allclose(student(input_ids=probe).logits, reference(input_ids=probe).logits, atol=1e-6)
    with pytest.raises(ValueError, match="not available with a LoRA student"):
        teacher.sync(student)

    save_stage(student, tokenizer, tmp_path / "saved", RunConfig(model=str(tiny_model)), "sdzero")
    assert not (tmp_path / "saved" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.allclose(merged(input_ids=probe).logits, student(input_ids=probe).logits, atol=1e-5)


def distill_command(run: Path, config: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sdzero.cli", "distill", "--out", str(run), "--config", str(config),
            "--max-steps", str(steps), "--quiet", *extra]


@pytest.mark.slow
def test_phase2_killed_mid_run_resumes_to_the_same_result(tmp_path, tiny_model):
    data = write_problems(tmp_path / "problems.jsonl", 40)
    settings = tiny_settings(tiny_model, data, distill={"save_every": 1, "max_steps": 30}, log={"tensorboard": False})
    config = write_config(tmp_path / "run.yaml", settings)
    model = ["--model", str(tiny_model)]

    straight = tmp_path / "straight"
    subprocess.run(distill_command(straight, config, 12, *model), env=ENV, check=True, capture_output=True)

    killed, signals = tmp_path / "killed", tmp_path / "signals"
    fifo = hold_at(signals, "phase2-step-3")
    process = subprocess.Popen(distill_command(killed, config, 12, *model),
                               env=dict(ENV, SDZERO_TEST_SIGNAL_DIR=str(signals)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    assert stop_at(process, fifo) == -signal.SIGKILL, "the run ended before it could be killed"
    assert json.loads((killed / "sdzero" / "checkpoint" / "state.json").read_text())["step"] == 3

    subprocess.run(distill_command(killed, config, 12, *model, "--resume"), env=ENV, check=True, capture_output=True)
    steps = [json.loads(line)["step"] for line in (killed / "sdzero" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)), "each step must be logged exactly once"
    a = AutoModelForCausalLM.from_pretrained(straight / "sdzero")
    b = AutoModelForCausalLM.from_pretrained(killed / "sdzero")
    assert torch.allclose(flat_weights(a), flat_weights(b), atol=1e-6)
    rewards = lambda run: [json.loads(line)["sdzero/reward"]  # noqa: E731
                           for line in (run / "sdzero" / "metrics.jsonl").read_text().splitlines()]
    assert rewards(killed) == rewards(straight)
    # the rollouts of step 10 (distill.rollouts_every), written once and the same
    rollouts = (killed / "sdzero" / "rollouts.jsonl").read_text()
    assert rollouts == (straight / "sdzero" / "rollouts.jsonl").read_text() and '"step": 10' in rollouts


def srt_command(run: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sdzero.cli", "srt", "--out", str(run), "--config", str(config), "--quiet",
            "--set", "srt.schedule=two_stage", *extra]


@pytest.mark.slow
def test_two_stage_srt_killed_in_stage_2_resumes_to_the_same_result(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"problem": f"What is {i} + {i}?", "init_reward": float(i % 2), "init_ids": tokenizer.encode(f"It is {i}"),
             "revised_ids": tokenizer.encode(str(2 * i)) + [tokenizer.eos_token_id]} for i in range(24)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for run in (straight, killed):
        (run / "phase1").mkdir(parents=True)
        (run / "phase1" / "revisions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    # steps an epoch: 3 in stage 1 (generation, on the 12 wrong-answer tuples), 6 in stage 2 (revision, all 24)
    epochs = 6
    stage_1, stage_2 = 3 * epochs, 6 * epochs
    settings = tiny_settings(tiny_model, write_problems(tmp_path / "problems.jsonl", 4),
                             srt={"epochs": epochs, "batch_size": 4, "save_every": 3}, log={"tensorboard": False})
    config = write_config(tmp_path / "run.yaml", settings)

    subprocess.run(srt_command(straight, config), env=ENV, check=True, capture_output=True)

    # killed in stage 2 one step after its checkpoint of step 21: the resumed run redoes step 22
    signals = tmp_path / "signals"
    fifo = hold_at(signals, f"srt-step-{stage_1 + 4}")
    process = subprocess.Popen(srt_command(killed, config), env=dict(ENV, SDZERO_TEST_SIGNAL_DIR=str(signals)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert stop_at(process, fifo) == -signal.SIGKILL, "the run ended before it could be killed"
    saved = json.loads((killed / "srt" / "checkpoint" / "state.json").read_text())
    logged = [json.loads(line) for line in (killed / "srt" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["stage"] == "srt/revision" and logged[-1]["step"] > saved["step"]
    assert saved["stage_index"] == 1 and stage_1 < saved["step"] < stage_1 + stage_2
    assert saved["stage_step"] == saved["step"] - stage_1

    subprocess.run(srt_command(killed, config, "--resume"), env=ENV, check=True, capture_output=True)
    logs = {run: [json.loads(line) for line in (run / "srt" / "metrics.jsonl").read_text().splitlines()]
            for run in (straight, killed)}
    steps = [m["step"] for m in logs[killed]]
    assert steps == list(range(1, stage_1 + stage_2 + 1)), "each step must be logged exactly once"
    assert [m["stage"] for m in logs[killed]] == ["srt/generation"] * stage_1 + ["srt/revision"] * stage_2
    # same losses, learning rates and token budget at every step (stage 2 went on, it did not start over)
    without_time = lambda run: [{k: v for k, v in m.items() if k != "seconds"} for m in logs[run]]  # noqa: E731
    assert without_time(killed) == without_time(straight)
    a = AutoModelForCausalLM.from_pretrained(straight / "srt").state_dict()
    b = AutoModelForCausalLM.from_pretrained(killed / "srt").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_collection_killed_mid_run_resumes_without_duplicates(tmp_path, tiny_model):
    data = write_problems(tmp_path / "problems.jsonl", 60)
    settings = tiny_settings(tiny_model, data, n_phase1=40, collect={"chunk_size": 4})
    config = write_config(tmp_path / "run.yaml", settings)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "sdzero.cli", "collect", "--out", str(run), "--config", str(config), "--quiet"]
    signals = tmp_path / "signals"
    fifo = hold_at(signals, "collect-chunk-2")  # 8 of the 40 problems written
    process = subprocess.Popen(command, env=dict(ENV, SDZERO_TEST_SIGNAL_DIR=str(signals)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert stop_at(process, fifo) == -signal.SIGKILL, "the collection ended before it could be killed"
    attempts = run / "phase1" / "attempts.jsonl"
    subprocess.run(command, env=ENV, check=True, capture_output=True)

    ids = [json.loads(line)["id"] for line in attempts.read_text().splitlines()]
    split = json.loads((run / "split.json").read_text())
    assert sorted(ids) == sorted(split["n_phase1"]), "every N1 problem exactly once"
    revisions = [json.loads(line) for line in (run / "phase1" / "revisions.jsonl").read_text().splitlines()]
    assert {r["id"] for r in revisions} <= set(ids)
    keys = [(r["id"], tuple(r["revised_ids"])) for r in revisions]
    assert len(keys) == len(set(keys))
    kept = {row["id"]: row["kept"] for row in map(json.loads, attempts.read_text().splitlines())}
    assert sum(kept.values()) == len(revisions)


@pytest.mark.slow
def test_two_processes_stay_in_step(tmp_path, tiny_model):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29517", str(TESTS / "distributed_run.py"), str(tiny_model), str(tmp_path)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    start = flat_weights(AutoModelForCausalLM.from_pretrained(tiny_model))
    for stage in ("srt", "distill"):
        assert torch.equal(ranks[0][stage], ranks[1][stage]), f"the processes drifted apart after {stage}"
    assert not torch.equal(ranks[0]["srt"], start) and not torch.equal(ranks[0]["distill"], ranks[0]["srt"])
    metrics = [json.loads(line) for line in (tmp_path / "sdzero" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # one writer


@pytest.mark.slow
def test_a_run_with_nothing_to_train_stops_after_the_base_evaluation_with_exit_3(tmp_path, tiny_model, capsys):
    data = write_problems(tmp_path / "problems.jsonl", 20)
    # math-verify never accepts a random model's text: no first answer is right, no revision is kept
    config = write_config(tmp_path / "run.yaml", tiny_settings(tiny_model, data, task="math"))
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--config", str(config), "--quiet"]) == 3
    assert "Phase 1 kept no verified revision" in capsys.readouterr().err
    report = json.loads((run / "report.json").read_text())
    assert set(report["accuracy"]) == {"base"} and report["phase1"]["kept"] == 0
    assert not (run / "srt").exists()


def test_bad_data_is_refused_naming_file_line_and_field(tmp_path, tiny_model, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "question": "1 + 1?", "answer": "2"}\n{"id": "b", "question": "", "answer": "3"}\n')
    config = write_config(tmp_path / "run.yaml", tiny_settings(tiny_model, bad, task="math"))
    assert main(["collect", "--out", str(tmp_path / "run"), "--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "'question'" in err and "empty" in err


@pytest.mark.slow
@pytest.mark.parametrize("dtype, checkpointing", [("bfloat16", False), ("float32", True)])
def test_phase2_step_in_bf16_and_with_gradient_checkpointing(tiny_model, dtype, checkpointing):
    from sdzero.distill import DistillConfig, distill
    from sdzero.generation import SamplingConfig
    from sdzero.modeling import load_model, prepare_for_training
    from sdzero.prompts import ControlPhrases
    from tiny import even_length

    model, tokenizer = load_model(str(tiny_model), device="cpu", dtype=dtype)
    model = prepare_for_training(model, gradient_checkpointing=checkpointing)
    assert model.dtype == getattr(torch, dtype) and model.is_gradient_checkpointing == checkpointing
    start = flat_weights(model).clone()
    problems = [{"id": str(i), "problem": f"What is {i}?", "answer": str(i)} for i in range(4)]
    distill(model, tokenizer, problems, even_length, ControlPhrases(), SamplingConfig(max_new_tokens=8),
            DistillConfig(prompts_per_step=4, micro_batch_size=2, max_steps=1, lr=1e-2, warmup_steps=1),
            progress=False)
    assert torch.isfinite(flat_weights(model).float()).all() and not torch.equal(flat_weights(model), start)


def test_weights_with_nan_or_inf_are_never_handed_on(tiny_model):
    from sdzero.training import check_finite

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    check_finite(model, "srt")  # a healthy model passes
    name, weight = next((n, p) for n, p in model.named_parameters() if "mlp" in n)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"srt: 1 weight tensors hold NaN or inf .*first: {name}.*"
                                                 r"nothing was saved. Likely causes"):
        check_finite(model, "srt")
