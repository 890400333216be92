"""Sampling from a causal LM given token-id contexts.

One interface, `Generator.sample(contexts, n, ...)`, used by collection, Phase 2 rollouts and
evaluation alike, so every stage samples with the same settings. The transformers backend batches
left-padded contexts and decodes with the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sdzero.prompts import end_of_turn_ids


@dataclass
class SamplingConfig:
    """How responses are sampled."""

    temperature: float = 1.0
    """Sampling temperature (official code 1.0; the paper 0.7)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0: off)."""
    max_new_tokens: int = 256
    """Longest sampled response, in tokens; longer ones are cut (and count as unfinished)."""
    batch_size: int = 256
    """Contexts decoded together."""


@dataclass
class Sample:
    ids: list[int]
    """Sampled response tokens, ending with the end-of-turn token unless cut by max_new_tokens."""
    text: str
    """The decoded response without special tokens."""
    finished: bool


class Generator:
    """transformers `generate` on left-padded batches (CPU or GPU)."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.eot_ids = end_of_turn_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def sample(self, contexts: list[list[int]], n: int = 1, *, desc: str | None = None,
               progress: bool = True) -> list[list[Sample]]:
        """`n` samples for each context, as a list (one entry per context) of lists of samples."""
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
        """Sample from `model` from now on (this backend reads the live weights: nothing to copy)."""
        self.model = model

    def _sample_batch(self, contexts: list[list[int]]) -> list[Sample]:
        device = next(self.model.parameters()).device
        width = max(map(len, contexts))
        input_ids = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(contexts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        s = self.sampling
        output = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            do_sample=s.temperature > 0, temperature=s.temperature if s.temperature > 0 else None,
            top_p=s.top_p if s.temperature > 0 else None, top_k=None,
            max_new_tokens=s.max_new_tokens, pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eot_ids), use_cache=True,
        )
        samples = []
        for row in output[:, width:].tolist():
            ids, finished = [], False
            for token in row:
                ids.append(token)
                if token in self.eot_ids:
                    finished = True
                    break
            samples.append(Sample(ids=ids, text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                  finished=finished))
        return samples


def make_generator(model, tokenizer, sampling: SamplingConfig) -> Generator:
    return Generator(model, tokenizer, sampling)
