"""Phase 2: on-policy self-distillation of the reviser back into the generator.

Each step, for a batch of prompts x from N2:
  1. the student samples ONE answer y per prompt and the verifier scores it (r in {0, 1});
  2. the frozen teacher reads prompt(x) + y + sep + P_r + sep + y in one assistant turn;
  3. at every token of y, the student's next-token distribution (given x, y_<t) is pulled towards
     the teacher's distribution for the same token of the second copy (given x, y, P_r, y_<t):
     L = mean over tokens of D(student || teacher) on the teacher's top-k support.
Right and wrong answers are both trained on; only P_r differs. Optionally the teacher is replaced
by the current student every N steps, or when the tracked accuracy stops improving (self-evolution).
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from sdzero.generation import Generator, SamplingConfig
from sdzero.losses import DIVERGENCES, per_token_divergence, teacher_topk
from sdzero.prompts import (ControlPhrases, DistillLayout, bridge_ids, distill_layout, end_of_turn_ids,
                            generator_prompt_ids)
from sdzero.training import MetricsLog, make_optimizer, make_schedule, model_device, pad_right
from sdzero.verifiers import Verifier


@dataclass
class DistillConfig:
    """Phase 2 on-policy self-distillation."""

    prompts_per_step: int = 128
    """Prompts per optimiser step, one rollout each (official: 128)."""
    micro_batch_size: int = 32
    """Rollouts per forward/backward pass; gradients accumulate over the step."""
    max_steps: int = 1000
    """Optimiser steps (official: up to 1000)."""
    lr: float = 5e-6
    """Learning rate after warm-up (official: 5e-6, constant)."""
    warmup_steps: int = 20
    grad_clip: float = 1.0
    divergence: str = "reverse"
    """"reverse" = KL(student || teacher) (paper), "forward" = KL(teacher || student), or "mixed"."""
    mixed_weight: float = 0.5
    """Weight of the forward term when divergence is "mixed" (official: 0.5)."""
    top_k: int | None = 64
    """Support = the teacher's top-k tokens, both sides renormalised; None = the full vocabulary."""
    tail_bucket: bool = False
    """Add one bucket per side for the probability mass outside the top-k."""
    teacher_max_length: int | None = None
    """Longest teacher context; longer samples have y truncated, samples whose prompt alone overflows are masked."""
    sync_every: int | None = None
    """Self-evolution: copy the student into the teacher every N steps (None: frozen teacher)."""
    sync_patience: int | None = None
    """Self-evolution: copy the student into the teacher when the tracked accuracy has not improved
    for this many evaluations (needs eval_every)."""
    eval_every: int | None = None
    """Evaluate the student every N steps (the learning curve and the plateau rule use it)."""

    def validate(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; choose one of {', '.join(DIVERGENCES)}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (full vocabulary), got {self.top_k}")
        if self.sync_patience is not None and not self.eval_every:
            raise ValueError("sync_patience needs eval_every: the plateau is judged on the evaluations")
        for name in ("prompts_per_step", "micro_batch_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def frozen_copy(model):
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def gather_positions(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits [B, L, V] at positions [B, T] -> [B, T, V]."""
    return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.size(-1)))


def micro_batch_tensors(layouts: list[DistillLayout], pad_id: int, device):
    """Right-padded student and teacher inputs, their target positions, and the target mask."""
    student_ids = pad_right([l.student_ids for l in layouts], pad_id)
    teacher_ids = pad_right([l.teacher_ids for l in layouts], pad_id)
    student_attention = pad_right([[1] * len(l.student_ids) for l in layouts], 0)
    teacher_attention = pad_right([[1] * len(l.teacher_ids) for l in layouts], 0)
    student_positions = pad_right([l.student_positions for l in layouts], 0)
    teacher_positions = pad_right([l.teacher_positions for l in layouts], 0)
    mask = pad_right([[1] * l.n_targets for l in layouts], 0).bool()
    tensors = (student_ids, student_attention, teacher_ids, teacher_attention, student_positions,
               teacher_positions, mask)
    return tuple(t.to(device) for t in tensors)


def distill(student, tokenizer, problems: list[dict], verifier: Verifier, phrases: ControlPhrases,
            sampling: SamplingConfig, cfg: DistillConfig, *, teacher=None, out_dir: str | Path | None = None,
            seed: int = 0, evaluate_fn: Callable[[object], float] | None = None,
            system_prompt: str | None = None, progress: bool = True) -> dict:
    """Train `student` in place. Without `teacher`, the teacher is a frozen copy of the starting student.

    `evaluate_fn(model) -> accuracy` is called every `cfg.eval_every` steps. Returns a summary with the
    evaluation history and the steps at which the teacher was synchronised.
    """
    cfg.validate()
    if not problems:
        raise ValueError("Phase 2 needs at least one prompt; the problem set is empty")
    teacher = teacher if teacher is not None else frozen_copy(student)
    teacher.eval()
    teacher.requires_grad_(False)
    device = model_device(student)
    pad_id = tokenizer.pad_token_id
    eot = end_of_turn_ids(tokenizer)
    generator = Generator(student, tokenizer, sampling)
    optimizer = make_optimizer(student, cfg.lr)
    schedule = make_schedule(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps, kind="constant")
    log = MetricsLog(Path(out_dir) / "metrics.jsonl") if out_dir else None
    bridges = {r: bridge_ids(tokenizer, phrases, r) for r in (0.0, 1.0)}
    rng = random.Random(seed)
    queue: list[dict] = []
    teacher_version, syncs, history = 0, [], []
    best, evals_since_best = float("-inf"), 0
    generations = sampled_tokens = trained_tokens = 0  # Phase 2's budget, cumulative
    start = time.time()

    def track(step: int) -> None:
        nonlocal best, evals_since_best, teacher_version
        accuracy = evaluate_fn(student)
        history.append({"step": step, "accuracy": accuracy, "teacher_version": teacher_version})
        if log:
            log.write({"stage": "distill", "step": step, "eval/accuracy": accuracy})
        if accuracy > best:
            best, evals_since_best = accuracy, 0
        else:
            evals_since_best += 1
        if cfg.sync_patience is not None and evals_since_best >= cfg.sync_patience:
            sync(step)
            evals_since_best = 0

    def sync(step: int) -> None:
        nonlocal teacher_version
        teacher.load_state_dict(student.state_dict())
        teacher_version += 1
        syncs.append(step)

    if evaluate_fn and cfg.eval_every:
        track(0)
    bar = tqdm(range(1, cfg.max_steps + 1), desc="distill", disable=not progress)
    for step in bar:
        # Walk through N2 in a fresh random order each epoch.
        batch = []
        while len(batch) < cfg.prompts_per_step:
            if not queue:
                queue = rng.sample(problems, len(problems))
            batch.append(queue.pop())
        prompts = [generator_prompt_ids(tokenizer, p["problem"], system_prompt) for p in batch]
        rollouts = [samples[0] for samples in generator.sample(prompts, 1, progress=False)]
        rewards = [verifier(y.text, p) for y, p in zip(rollouts, batch)]
        layouts = [distill_layout(prompt, y.ids, bridges[r], eot, cfg.teacher_max_length)
                   for prompt, y, r in zip(prompts, rollouts, rewards)]
        kept = [(layout, r) for layout, r in zip(layouts, rewards) if layout is not None and layout.n_targets]
        n_tokens = sum(layout.n_targets for layout, _ in kept)
        generations += len(rollouts)
        sampled_tokens += sum(len(y.ids) for y in rollouts)
        trained_tokens += sum(len(layout.student_ids) for layout, _ in kept)

        student.train()
        optimizer.zero_grad(set_to_none=True)
        token_kl = {0.0: [0.0, 0], 1.0: [0.0, 0]}  # reward -> [sum of per-token KL, tokens]
        total_loss = 0.0
        for i in range(0, len(kept), cfg.micro_batch_size):
            micro = kept[i:i + cfg.micro_batch_size]
            (s_ids, s_att, t_ids, t_att, s_pos, t_pos, mask) = micro_batch_tensors([m[0] for m in micro], pad_id,
                                                                                  device)
            with torch.no_grad():
                teacher_logits = gather_positions(teacher(input_ids=t_ids, attention_mask=t_att).logits, t_pos)
                teacher_logprobs, teacher_indices = teacher_topk(teacher_logits, cfg.top_k)
                del teacher_logits
            student_logits = gather_positions(student(input_ids=s_ids, attention_mask=s_att).logits, s_pos)
            per_token = per_token_divergence(student_logits, teacher_logprobs, teacher_indices,
                                             divergence=cfg.divergence, mixed_weight=cfg.mixed_weight,
                                             tail_bucket=cfg.tail_bucket)
            per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
            # Divide by the step's token count so the accumulated gradient is the mean over all its tokens.
            loss = per_token.sum() / n_tokens
            loss.backward()
            total_loss += loss.item()
            per_sample = per_token.detach().sum(1).tolist()
            for (layout, r), kl in zip(micro, per_sample):
                token_kl[r][0] += kl
                token_kl[r][1] += layout.n_targets
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip).item() if kept else 0.0
        if kept:
            optimizer.step()
        schedule.step()

        record = {
            "stage": "distill", "step": step, "loss": total_loss,
            "sdzero/reward": sum(rewards) / len(rewards),
            "sdzero/kl": total_loss,
            "sdzero/kl_wrong": token_kl[0.0][0] / max(1, token_kl[0.0][1]),
            "sdzero/kl_right": token_kl[1.0][0] / max(1, token_kl[1.0][1]),
            "sdzero/response_len": sum(len(y.ids) for y in rollouts) / len(rollouts),
            "sdzero/truncated": sum(1 for l in layouts if l is not None and l.truncated),
            "sdzero/masked_out": sum(1 for l in layouts if l is None),
            "sdzero/teacher_version": teacher_version,
            "sdzero/grad_norm": grad_norm, "lr": schedule.get_last_lr()[0], "seconds": time.time() - start,
            "budget/generations": generations, "budget/sampled_tokens": sampled_tokens,
            "budget/trained_tokens": trained_tokens,
        }
        if log:
            log.write(record)
        bar.set_postfix(reward=f"{record['sdzero/reward']:.2f}", kl=f"{total_loss:.4f}")
        if cfg.sync_every and step % cfg.sync_every == 0:
            sync(step)
        if evaluate_fn and cfg.eval_every and step % cfg.eval_every == 0:
            track(step)
    student.eval()
    return {"steps": cfg.max_steps, "history": history, "syncs": syncs, "teacher_version": teacher_version,
            "seconds": time.time() - start, "generations": generations, "sampled_tokens": sampled_tokens,
            "trained_tokens": trained_tokens}
