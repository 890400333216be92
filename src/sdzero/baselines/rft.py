"""RFT (rejection-sampling fine-tuning): sample G answers per question from the starting model, keep
the verified-correct ones (de-duplicated), and fine-tune on them with NLL(answer | prompt).

All samples come from the starting model, so a smaller budget is simply a prefix of the questions:
the learning curve point for a fraction f of the budget is an RFT run trained on the answers of the
first f of the questions (from a copy of the starting model; those runs are not billed). Its wall time
is the fraction f of the sampling time plus that run's own training time.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdzero.budget import Budget, LearningCurve
from sdzero.errors import Refusal
from sdzero.generation import Generator
from sdzero.prompts import generator_prompt_ids
from sdzero.training import MetricsLog, make_optimizer, make_schedule, sft_step_loss
from sdzero.rewards import Verifier


@dataclass
class RFTConfig:
    """Rejection-sampling fine-tuning."""

    samples_per_question: int = 4
    """Answers G sampled per question (paper: 4)."""
    lr: float = 5e-6
    """Peak learning rate (cosine schedule, as SRT)."""
    epochs: int = 3
    """Epochs over the kept answers."""
    batch_size: int = 16
    """Kept answers per optimiser step."""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming the learning rate up."""
    grad_clip: float = 1.0
    """Largest gradient norm (clipped above)."""
    curve_fractions: list = field(default_factory=lambda: [0.5])
    """Budget fractions (< 1) at which extra RFT runs measure the learning curve."""


def sample_correct(generator: Generator, questions: list[dict], verifier: Verifier, cfg: RFTConfig, budget: Budget,
                   *, system_prompt: str | None = None, progress: bool = True) -> list[list[tuple]]:
    """Per question, its distinct verified-correct (prompt ids, answer ids) pairs."""
    prompts = [generator_prompt_ids(generator.tokenizer, q["problem"], system_prompt) for q in questions]
    answers = generator.sample(prompts, cfg.samples_per_question, desc="rft sampling", progress=progress)
    kept = []
    verdicts = Verifier.of(verifier).score_groups(answers, questions, generator.sampling)
    for question, prompt, samples, rewards in zip(questions, prompts, answers, verdicts):
        budget.sampled([question["id"]] * len(samples), [len(s.ids) for s in samples])
        distinct = {tuple(s.ids): s for s, r in zip(samples, rewards) if r == 1.0}
        kept.append([(prompt, list(ids)) for ids in distinct])
    return kept


def fine_tune(model, tokenizer, examples: list[tuple], cfg: RFTConfig, *, seed: int, log: MetricsLog | None = None,
              budget: Budget | None = None, progress: bool = True) -> int:
    """SFT on (prompt, answer) pairs in place; returns the optimiser steps taken."""
    if not examples:
        return 0
    rng = random.Random(seed)
    steps_per_epoch = -(-len(examples) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(model, cfg.lr)
    schedule = make_schedule(optimizer, warmup_steps=max(1, int(cfg.warmup_ratio * total)), total_steps=total)
    model.train()
    step = 0
    bar = tqdm(total=total, desc="rft training", disable=not progress)
    for epoch in range(cfg.epochs):
        order = rng.sample(range(len(examples)), len(examples))
        for i in range(0, len(order), cfg.batch_size):
            batch = [examples[j] for j in order[i:i + cfg.batch_size]]
            loss = sft_step_loss(model, [batch], tokenizer.pad_token_id)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            schedule.step()
            step += 1
            if budget:
                budget.trained(sum(len(c) + len(t) for c, t in batch))
            if log:
                log.write({"stage": "rft", "step": step, "epoch": epoch, "loss": loss.item(),
                           "lr": schedule.get_last_lr()[0], **(budget.record() if budget else {})})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return step


def train_rft(model, tokenizer, questions: list[dict], verifier: Verifier, generator: Generator, cfg: RFTConfig,
              budget: Budget, *, out_dir: str | Path | None = None, seed: int = 0, evaluate_fn=None,
              system_prompt: str | None = None, progress: bool = True) -> dict:
    """Sample, filter and fine-tune `model` in place (`generator` samples from `model`); returns a summary."""
    if not questions:
        raise Refusal("RFT needs at least one question; the question set is empty")
    if any(not 0 < f < 1 for f in cfg.curve_fractions):
        raise Refusal(f"rft.curve_fractions must lie strictly between 0 and 1, got {cfg.curve_fractions}")
    curve = LearningCurve(budget, evaluate_fn)
    kept = sample_correct(generator, questions, verifier, cfg, budget, system_prompt=system_prompt,
                          progress=progress)
    per_question = cfg.samples_per_question
    sampling_seconds = budget.wall_seconds
    if evaluate_fn:
        for fraction in sorted(cfg.curve_fractions):
            n = max(1, round(fraction * len(questions)))
            with budget.excluded():
                begin = time.time()
                partial = copy.deepcopy(model)
                fine_tune(partial, tokenizer, [e for rows in kept[:n] for e in rows], cfg, seed=seed,
                          progress=False)
                training_seconds = time.time() - begin
            curve.point(partial, generations=n * per_question,
                        wall_seconds=sampling_seconds * n / len(questions) + training_seconds)
            del partial
    examples = [e for rows in kept for e in rows]
    log = MetricsLog(Path(out_dir) / "metrics.jsonl") if out_dir else None
    steps = fine_tune(model, tokenizer, examples, cfg, seed=seed, log=log, budget=budget, progress=progress)
    curve.point(model)
    return {"kept": len(examples), "questions_with_a_correct_answer": sum(1 for rows in kept if rows),
            "steps": steps, "curve": curve.points}
