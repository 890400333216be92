"""Sampling backends: the transformers Generator for real with the lab model, the vLLM adapter against a
stand-in `vllm` module, and the backend rule of make_generator.

The main environment has no vLLM (its CPU build pins another transformers; `make test-vllm` runs the
adapter against the real engine in a venv of its own, tests/with_vllm), so the vLLM tests here put a small fake
`vllm` module into sys.modules. The fake records what the adapter hands to `LLM(...)`, `SamplingParams(...)`
and `LLM.generate(...)`, returns scripted completions, and plays vLLM's model for the weight push: it
loads the folder the adapter wrote with transformers and its `load_weights` copies (checkpoint name,
tensor) pairs into that model by name, as vLLM's loaders map checkpoint names. Everything else (the lab
model, its tokenizer, peft, the checkpoint folder) is real.
"""

import copy
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdzero import lab
from sdzero.generation import (Generator, Sample, SamplingConfig, VLLMGenerator, checkpoint_weights, logits_settings,
                               make_generator, next_tokens)
from sdzero.prompts import end_of_turn_ids, generator_prompt_ids


def lab_prompts(tokenizer, n: int) -> list[list[int]]:
    _, rows, _ = lab.problem_sets(0, n, 0, seed=3)
    prompts = [generator_prompt_ids(tokenizer, row["problem"]) for row in rows]
    # A system prompt on every other context makes the lengths differ a lot, so batches need padding.
    prompts[::2] = [generator_prompt_ids(tokenizer, row["problem"], "Work step by step.") for row in rows[::2]]
    return prompts


# ----------------------------------------------------------------------------------------------------------
# transformers backend, for real


def test_generator_shapes_and_end_of_turn(lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    eot = end_of_turn_ids(tokenizer)
    prompts = lab_prompts(tokenizer, 3)
    torch.manual_seed(0)
    samples = Generator(model, tokenizer, SamplingConfig(max_new_tokens=160)).sample(prompts, 2, progress=False)
    assert [len(s) for s in samples] == [2, 2, 2]
    flat = [s for per_context in samples for s in per_context]
    assert any(s.finished for s in flat)  # the lab model answers well within 200 tokens
    for s in flat:
        assert s.finished == (s.ids[-1] in eot)
        assert not any(t in eot for t in s.ids[:-1])  # nothing after the end of the turn
        assert s.text == tokenizer.decode(s.ids, skip_special_tokens=True)

    cut = Generator(model, tokenizer, SamplingConfig(max_new_tokens=4)).sample(prompts, 1, progress=False)
    for [s] in cut:
        assert len(s.ids) <= 4
        assert s.finished == (s.ids[-1] in eot) and (s.finished or len(s.ids) == 4)


def test_greedy_results_do_not_depend_on_batch_size(lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    prompts = lab_prompts(tokenizer, 4)
    assert len({len(p) for p in prompts}) > 1

    def greedy(batch_size, n):
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=40, batch_size=batch_size)
        return [[s.ids for s in per_context] for per_context in
                Generator(model, tokenizer, sampling).sample(prompts, n, progress=False)]

    alone = greedy(1, 1)  # no padding at all
    together = greedy(8, 2)  # one left-padded batch of 8 rows
    assert together == [[ids, ids] for [ids] in alone]


@pytest.mark.parametrize("wrapper", ["none", "lora"])
def test_decoding_loop_matches_transformers_generate(lab_model_and_tokenizer, wrapper):
    """The decoding loop drops each row from the batch once it has ended. Greedily it must give exactly
    what transformers' `generate` gives for each context alone (the plain reference: no padding, no
    rows dropped), for answers that end at different steps and for answers cut at max_new_tokens; also
    through a peft wrapper, whose forward hides the model's signature."""
    model, tokenizer = lab_model_and_tokenizer
    if wrapper == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():  # adapters that change the answers a little
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    prompts = lab_prompts(tokenizer, 12)
    eot = sorted(end_of_turn_ids(tokenizer))
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=48, batch_size=24)
    ours = [s[0] for s in Generator(model, tokenizer, sampling).sample(prompts, 1, progress=False)]
    reference = []
    for prompt in prompts:
        out = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=48,
                             eos_token_id=eot, pad_token_id=tokenizer.pad_token_id)
        reference.append(out[0, len(prompt):].tolist())
    assert [s.ids for s in ours] == reference
    finished = [s for s in ours if s.finished]
    assert len({len(s.ids) for s in finished}) > 1  # rows left the batch at different steps
    assert any(not s.finished for s in ours)  # and some ran to the end


def test_sampled_tokens_are_drawn_from_the_full_context_distribution(lab_model_and_tokenizer, monkeypatch):
    """On sampled paths (T = 1, rows leaving the batch as they end, contexts of different lengths), every
    step's distribution equals the model's on the whole unpadded context, computed without a cache."""
    model, tokenizer = lab_model_and_tokenizer
    prompts = lab_prompts(tokenizer, 16)
    steps = []  # each step's log-probabilities, one row per context still in the batch

    def recording(logits, temperature, top_p):
        steps.append(logits.log_softmax(-1))
        return next_tokens(logits, temperature, top_p)

    monkeypatch.setattr("sdzero.generation.next_tokens", recording)
    torch.manual_seed(0)
    sampling = SamplingConfig(max_new_tokens=64, batch_size=16)
    samples = [s[0] for s in Generator(model, tokenizer, sampling).sample(prompts, 1, progress=False)]
    assert any(s.finished for s in samples) and any(not s.finished for s in samples)

    live = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # the batch's row order
    seen = {i: [] for i in live}
    for step, logprobs in enumerate(steps):
        assert len(logprobs) == len(live)
        for row, i in enumerate(live):
            seen[i].append(logprobs[row])
        live = [i for i in live if len(samples[i].ids) > step + 1]
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            full = model(torch.tensor([prompt + samples[i].ids])).logits[0].log_softmax(-1)
        expected = full[len(prompt) - 1:len(prompt) - 1 + len(samples[i].ids)]
        assert torch.allclose(torch.stack(seen[i]), expected, atol=1e-4)


def test_a_generation_config_that_changes_the_logits_is_applied_as_generate_applies_it(lab_model_and_tokenizer):
    """A model saved with, say, a repetition penalty samples through transformers `generate`, which
    applies it, as before the decoding loop existed; the lab model's own config has no such setting."""
    model, tokenizer = lab_model_and_tokenizer
    penalised = copy.deepcopy(model)
    penalised.generation_config.repetition_penalty = 1.5
    assert logits_settings(model) == [] and logits_settings(penalised) == ["repetition_penalty"]
    prompts = lab_prompts(tokenizer, 4)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=40)
    ours = [s[0].ids for s in Generator(penalised, tokenizer, sampling).sample(prompts, 1, progress=False)]
    plain = [s[0].ids for s in Generator(model, tokenizer, sampling).sample(prompts, 1, progress=False)]
    eot = sorted(end_of_turn_ids(tokenizer))
    reference = [penalised.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=40, eos_token_id=eot,
                                    pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist() for p in prompts]
    assert ours == reference and ours != plain


def reference_nucleus(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """The tempered softmax kept to the smallest set of most likely tokens whose mass reaches top_p."""
    weights = [math.exp(x / temperature) for x in logits]
    probs = [w / sum(weights) for w in weights]
    kept, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if mass >= top_p:
            break
        kept.add(token)
        mass += probs[token]
    return [probs[t] / mass if t in kept else 0.0 for t in range(len(probs))]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (2.0, 0.5)])
def test_next_tokens_draws_from_the_tempered_nucleus(temperature, top_p):
    logits = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0]
    expected = torch.tensor(reference_nucleus(logits, temperature, top_p))
    torch.manual_seed(0)
    draws = next_tokens(torch.tensor([logits]).expand(20000, -1), temperature, top_p)
    observed = torch.bincount(draws, minlength=len(logits)) / len(draws)
    assert (observed[expected == 0] == 0).all()  # nothing outside the nucleus
    assert (observed - expected).abs().max() < 0.015  # 4 standard errors of 20000 draws
    assert next_tokens(torch.tensor([logits, logits[::-1]]), 0.0, 1.0).tolist() == [0, 5]  # greedy: the argmax


def test_generator_refresh_samples_from_the_given_model(lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(torch.randn_like(other.model.embed_tokens.weight))
    prompts = lab_prompts(tokenizer, 2)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=30)
    generator = Generator(model, tokenizer, sampling)
    before = [s[0].ids for s in generator.sample(prompts, 1, progress=False)]
    expected = [s[0].ids for s in Generator(other, tokenizer, sampling).sample(prompts, 1, progress=False)]
    assert before != expected
    generator.refresh(other)
    assert [s[0].ids for s in generator.sample(prompts, 1, progress=False)] == expected


# ----------------------------------------------------------------------------------------------------------
# vLLM adapter, against a fake vllm module (no GPU, no vLLM here)


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLLM:
    """Stand-in for vllm.LLM: records its inputs and returns scripted completions."""

    def __init__(self, model, **kwargs):
        self.path, self.kwargs = model, kwargs
        self.engine_model = AutoModelForCausalLM.from_pretrained(model)  # what vLLM would load
        self.engine_model.load_weights = self._load_weights
        self.pushed: list[str] = []
        self.generate_calls = []
        self.prefix_cache_resets = 0
        self.script = None  # prompt ids -> list of (token_ids, finish_reason, stop_reason), by index
        FakeLLM.last = self

    def _load_weights(self, weights):
        params = dict(self.engine_model.named_parameters())
        for name, tensor in weights:
            params[name].data.copy_(tensor)  # KeyError if a name is not a checkpoint name
            self.pushed.append(name)

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights" and kwargs["is_checkpoint_format"]
        self._load_weights(kwargs["weights_iterator"])

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1

    def generate(self, prompts, params, use_tqdm=True):
        self.generate_calls.append((prompts, params, use_tqdm))
        outputs = []
        for prompt in prompts:
            scripted = self.script(prompt["prompt_token_ids"])[:params.kwargs["n"]]
            completions = [types.SimpleNamespace(index=i, token_ids=tuple(ids), finish_reason=reason,
                                                 stop_reason=stop) for i, (ids, reason, stop) in enumerate(scripted)]
            # vLLM does not promise the completions of a request in index order
            outputs.append(types.SimpleNamespace(outputs=completions[::-1]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return module


def test_vllm_engine_starts_from_the_model_weights(fake_vllm, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    sampling = SamplingConfig(vllm_gpu_memory_utilization=0.25)
    generator = VLLMGenerator(model, tokenizer, sampling)
    llm = generator.llm
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert llm.kwargs["dtype"] == "float32" and llm.kwargs["gpu_memory_utilization"] == 0.25
    assert llm.kwargs["tokenizer"] == llm.path and (Path(llm.path) / "tokenizer_config.json").exists()
    saved = dict(llm.engine_model.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(saved[name], param), name


def test_vllm_sample_passes_token_ids_and_maps_sampling(fake_vllm, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    eot = end_of_turn_ids(tokenizer)
    stop = min(eot)
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=5)
    generator = VLLMGenerator(model, tokenizer, sampling)
    word = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("12")[0])
    generator.llm.script = lambda prompt: [
        ([word, len(prompt), stop], "stop", stop),  # ends on the end-of-turn token
        ([word] * 5, "length", None),  # cut by max_tokens
        ([word, len(prompt)], "stop", stop),  # stop token left out of token_ids
    ]
    contexts = [[5, 6, 7], [8, 9]]
    samples = generator.sample(contexts, 3, desc="rollouts")

    [(prompts, params, use_tqdm)] = generator.llm.generate_calls
    assert prompts == [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8, 9]}]
    assert use_tqdm
    assert params.kwargs == {"n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 5,
                             "stop_token_ids": sorted(eot), "ignore_eos": True, "detokenize": False}
    assert [len(s) for s in samples] == [3, 3]
    for context, per_context in zip(contexts, samples):
        assert per_context == [
            Sample([word, len(context), stop], tokenizer.decode([word, len(context)], skip_special_tokens=True), True),
            Sample([word] * 5, tokenizer.decode([word] * 5), False),
            Sample([word, len(context), stop], tokenizer.decode([word, len(context)], skip_special_tokens=True), True),
        ]
    generator.sample(contexts, 1, desc="quiet", progress=False)
    assert generator.llm.generate_calls[-1][2] is False


def test_vllm_greedy_decodes_once_and_repeats(fake_vllm, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    stop = min(end_of_turn_ids(tokenizer))
    generator = VLLMGenerator(model, tokenizer, SamplingConfig(temperature=0.0, top_p=0.5))
    generator.llm.script = lambda prompt: [([prompt[0], stop], "stop", stop)]
    samples = generator.sample([[11], [12]], 4, progress=False)
    params = generator.llm.generate_calls[0][1].kwargs
    assert params["n"] == 1 and params["temperature"] == 0.0 and params["top_p"] == 1.0
    assert [[s.ids for s in per_context] for per_context in samples] == [[[11, stop]] * 4, [[12, stop]] * 4]
    assert samples[0][0] is not samples[0][1]


def test_vllm_refresh_pushes_every_parameter_by_checkpoint_name(fake_vllm, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    student = copy.deepcopy(model)
    generator = VLLMGenerator(student, tokenizer, SamplingConfig())
    with torch.no_grad():  # stands in for an optimiser step
        for param in student.parameters():
            param.add_(torch.randn_like(param) * 1e-2)
    generator.refresh(student)
    llm = generator.llm
    names = [name for name, _ in student.named_parameters()]
    assert sorted(llm.pushed) == sorted(names)
    engine = dict(llm.engine_model.named_parameters())
    for name, param in student.named_parameters():
        assert torch.equal(engine[name], param), name
    assert llm.prefix_cache_resets == 1


def test_lora_weights_are_pushed_merged_without_touching_the_model(fake_vllm, lab_model_and_tokenizer):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = lab_model_and_tokenizer
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"])
    peft_model = get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero and the saved copies equal the originals: make both matter
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    before = {n: p.clone() for n, p in peft_model.named_parameters()}
    reference = copy.deepcopy(peft_model).merge_and_unload()

    pushed = dict(checkpoint_weights(peft_model))
    assert sorted(pushed) == sorted(n for n, _ in reference.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(pushed[name], param, msg=name)
    assert any(not torch.equal(pushed[n], p) for n, p in model.named_parameters())  # the adapter counts
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters())

    generator = VLLMGenerator(peft_model, tokenizer, SamplingConfig())  # the engine starts merged too
    engine = dict(generator.llm.engine_model.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(engine[name], param, msg=name)
    generator.refresh(peft_model)
    assert sorted(generator.llm.pushed) == sorted(pushed)


# ----------------------------------------------------------------------------------------------------------
# backend rule


def test_auto_is_transformers_without_a_gpu(fake_vllm, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    assert not torch.cuda.is_available()
    assert type(make_generator(model, tokenizer, SamplingConfig())) is Generator
    assert type(make_generator(model, tokenizer, SamplingConfig(backend="transformers"))) is Generator


def test_auto_is_vllm_when_importable_and_on_cuda(fake_vllm, monkeypatch, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU here
    assert isinstance(make_generator(model, tokenizer, SamplingConfig()), VLLMGenerator)
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    assert type(make_generator(model, tokenizer, SamplingConfig())) is Generator


def test_vllm_backend_errors_name_the_fix(monkeypatch, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail, whatever is installed
    with pytest.raises(ValueError, match=r"pip install 'sdzero\[vllm\]'"):
        make_generator(model, tokenizer, SamplingConfig(backend="vllm"))
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        make_generator(model, tokenizer, SamplingConfig(backend="vllm"))
    with pytest.raises(ValueError, match="unknown sampling backend 'vlm'"):
        make_generator(model, tokenizer, SamplingConfig(backend="vlm"))
