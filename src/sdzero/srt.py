"""Phase 1 training: Self-Revision Training (SRT) on the kept revision tuples.

    L_revision   = NLL(y_revised | x, y_init, P_r)         loss on the revision tokens only
    L_generation = NLL([y_init, P_r, y_revised] | x)       loss on the whole assistant response

"joint" (the paper) minimises L_revision + L_generation on every batch. "two_stage" (the official
release) first trains L_generation on the tuples whose first answer was wrong, then L_revision.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdzero.prompts import ControlPhrases, bridge_ids, end_of_turn_ids, generator_prompt_ids, strip_end_of_turn
from sdzero.training import MetricsLog, make_optimizer, make_schedule, sft_step_loss

SCHEDULES = ("joint", "two_stage")


@dataclass
class SRTConfig:
    """Phase 1 training."""

    schedule: str = "joint"
    """"joint" (L_rev + L_gen, paper) or "two_stage" (generation on wrong-answer tuples, then revision)."""
    lr: float = 5e-6
    """Peak learning rate (paper, 4B-7B models: 5e-6)."""
    epochs: int = 3
    """Epochs (per stage for two_stage)."""
    batch_size: int = 16
    """Tuples per optimiser step."""
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0


def revision_example(tokenizer, row: dict, phrases: ControlPhrases, system_prompt: str | None = None):
    """(context, target) for L_revision and for L_generation, built from one kept tuple."""
    prompt = generator_prompt_ids(tokenizer, row["problem"], system_prompt)
    first = strip_end_of_turn(row["init_ids"], end_of_turn_ids(tokenizer))
    bridge = bridge_ids(tokenizer, phrases, row["init_reward"])
    revision = (prompt + first + bridge, list(row["revised_ids"]))
    generation = (prompt, first + bridge + list(row["revised_ids"]))
    return revision, generation


def train_srt(model, tokenizer, rows: list[dict], phrases: ControlPhrases, cfg: SRTConfig, *,
              out_dir: str | Path | None = None, seed: int = 0, system_prompt: str | None = None,
              progress: bool = True) -> dict:
    """Train `model` in place on the kept revision tuples; returns a summary."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown SRT schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not rows:
        raise ValueError("SRT needs at least one kept revision tuple; collection kept none")
    examples = [revision_example(tokenizer, row, phrases, system_prompt) for row in rows]
    if cfg.schedule == "joint":
        stages = [("joint", examples)]
    else:
        stages = [("generation", [e for e, row in zip(examples, rows) if row["init_reward"] < 1.0]),
                  ("revision", examples)]
    log = MetricsLog(Path(out_dir) / "metrics.jsonl") if out_dir else None
    pad_id = tokenizer.pad_token_id
    rng = random.Random(seed)
    start, step, trained_tokens = time.time(), 0, 0
    model.train()
    for stage, stage_examples in stages:
        if not stage_examples:
            continue
        steps_per_epoch = -(-len(stage_examples) // cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        schedule = make_schedule(optimizer, warmup_steps=max(1, int(cfg.warmup_ratio * total)), total_steps=total)
        bar = tqdm(total=total, desc=f"srt ({stage})", disable=not progress)
        for epoch in range(cfg.epochs):
            order = list(range(len(stage_examples)))
            rng.shuffle(order)
            for i in range(0, len(order), cfg.batch_size):
                batch = [stage_examples[j] for j in order[i:i + cfg.batch_size]]
                revision, generation = [b[0] for b in batch], [b[1] for b in batch]
                if stage == "joint":
                    loss = sft_step_loss(model, revision, pad_id) + sft_step_loss(model, generation, pad_id)
                elif stage == "generation":
                    loss = sft_step_loss(model, generation, pad_id)
                else:
                    loss = sft_step_loss(model, revision, pad_id)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # Budget: tokens of every sequence that went through forward and backward this step.
                sequences = (revision + generation if stage == "joint" else
                             generation if stage == "generation" else revision)
                trained_tokens += sum(len(c) + len(t) for c, t in sequences)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                schedule.step()
                step += 1
                if log:
                    log.write({"stage": f"srt/{stage}", "step": step, "epoch": epoch, "loss": loss.item(),
                               "lr": schedule.get_last_lr()[0], "seconds": time.time() - start,
                               "budget/trained_tokens": trained_tokens})
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
    model.eval()
    return {"tuples": len(rows), "steps": step, "seconds": time.time() - start, "trained_tokens": trained_tokens}
