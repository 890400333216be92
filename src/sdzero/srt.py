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

from tqdm.auto import tqdm

from sdzero.checks import check_ranges
from sdzero.errors import Refusal
from sdzero.modeling import tokenizer_fingerprint
from sdzero.prompts import ControlPhrases, bridge_ids, end_of_turn_ids, generator_prompt_ids, strip_end_of_turn
from sdzero.training import (LogConfig, MetricsLog, check_finite, finish_trackers, load_checkpoint,
                             make_accelerator, make_optimizer, make_schedule, prepare, reached, read_json,
                             save_checkpoint, sft_step_loss)

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
    """Share of the steps with a linear warm-up, before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clipping."""
    save_every: int | None = 100
    """Write a checkpoint to resume from (model, optimiser, scheduler, RNG, step) every N steps."""

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise Refusal(f"unknown SRT schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        # grad_clip <= 0 would flip or zero every update: a clip is a positive norm
        check_ranges("srt", self, {"lr": "> 0", "epochs": ">= 1", "batch_size": ">= 1", "warmup_ratio": "in [0, 1)",
                                   "weight_decay": ">= 0", "grad_clip": "> 0", "save_every": ">= 1"})


def revision_example(tokenizer, row: dict, phrases: ControlPhrases, system_prompt: str | None = None):
    """(context, target) for L_revision and for L_generation, built from one kept tuple."""
    prompt = generator_prompt_ids(tokenizer, row["problem"], system_prompt)
    first = strip_end_of_turn(row["init_ids"], end_of_turn_ids(tokenizer))
    bridge = bridge_ids(tokenizer, phrases, row["init_reward"])
    revision = (prompt + first + bridge, list(row["revised_ids"]))
    generation = (prompt, first + bridge + list(row["revised_ids"]))
    return revision, generation


def check_tuples(rows: list[dict], tokenizer, path: Path) -> None:
    """Tuples hold token ids, which mean text only under the tokenizer that made them: refuse those of
    another tokenizer (recorded in each tuple) and ids the tokenizer does not have."""
    fingerprint, vocab = tokenizer_fingerprint(tokenizer), len(tokenizer)
    for line, row in enumerate(rows, 1):
        if row.get("tokenizer", fingerprint) != fingerprint:
            raise Refusal(f"{path}:{line}: the tuple was tokenized by another tokenizer (fingerprint "
                             f"{row['tokenizer']}, the model's is {fingerprint}): collect again with this model")
        bad = next((i for i in row["init_ids"] + row["revised_ids"] if not 0 <= i < vocab), None)
        if bad is not None:
            raise Refusal(f"{path}:{line}: token id {bad} is outside the model's vocabulary of {vocab}: the tuple "
                             "was collected with another tokenizer")


def checkpoint_stage(checkpoint_dir: Path) -> int | None:
    """The stage index of the checkpoint that `load_checkpoint` would restore, or None without one."""
    for folder in (checkpoint_dir, checkpoint_dir.with_name(checkpoint_dir.name + ".old")):
        if (folder / "state.json").exists():
            return read_json(folder / "state.json")["stage_index"]
    return None


def srt_step(accelerator, model, optimizer, groups: list[list[tuple[list[int], list[int]]]], pad_id: int,
             grad_clip: float):
    """One SRT optimiser step: the mean NLL of each group of (context, target) pairs, summed over the groups
    (one forward pass for all of them), then backward, gradient clipping and the optimiser step. Returns the
    loss. `train_srt` trains with it; `benchmarks/phase2_step.py` times it as the SFT step."""
    loss = sum(sft_step_loss(model, groups, pad_id))
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss


def train_srt(model, tokenizer, rows: list[dict], phrases: ControlPhrases, cfg: SRTConfig, *,
              out_dir: str | Path | None = None, seed: int = 0, system_prompt: str | None = None,
              progress: bool = True, resume: bool = False, log_config: LogConfig | None = None) -> dict:
    """Train `model` in place on the kept revision tuples; returns a summary.

    Runs in every process of `accelerate launch` (each takes its slice of every batch). With `out_dir`,
    metrics go to out_dir/metrics.jsonl and a checkpoint to out_dir/checkpoint every `cfg.save_every`
    steps; `resume=True` continues from it.
    """
    cfg.validate()
    if not rows:
        raise Refusal("SRT needs at least one kept revision tuple; collection kept none")
    examples = [revision_example(tokenizer, row, phrases, system_prompt) for row in rows]
    checkpoint_dir = Path(out_dir) / "checkpoint" if out_dir else None
    pad_id = tokenizer.pad_token_id
    # A resumed run starts in the stage its checkpoint was written in: the stages before it are finished (the
    # checkpoint holds their weights), so they are skipped without building their optimiser, and the
    # checkpoint's optimiser and schedule go into that stage's own objects.
    resume_stage = checkpoint_stage(checkpoint_dir) if resume and checkpoint_dir else None
    start, step, trained_tokens, first = time.time(), 0, 0, True
    for stage_index, (stage, stage_examples) in enumerate(_stages(cfg.schedule, rows, examples)):
        if not stage_examples or (resume_stage is not None and stage_index < resume_stage):
            continue
        accelerator, log, wrapped, optimizer, schedule, total = _stage_runtime(model, cfg, len(stage_examples),
                                                                               out_dir, log_config)
        stage_step = 0
        if first:  # the first stage this call trains: continue from the checkpoint, or start a fresh log
            first = False
            step, stage_step, trained_tokens = _first_stage_start(accelerator, log, checkpoint_dir, wrapped,
                                                                  optimizer, resume, resume_stage)
        wrapped.train()
        bar = tqdm(total=total, initial=stage_step, desc=f"srt ({stage})",
                   disable=not progress or not accelerator.is_main_process)
        rank, world = accelerator.process_index, accelerator.num_processes
        for epoch, mine, whole in _batches(len(stage_examples), cfg, seed + stage_index, stage_step, rank, world):
            trained_tokens += _trained_tokens(stage, [stage_examples[j] for j in whole])
            groups = _loss_groups(stage, [stage_examples[j] for j in mine])
            loss = srt_step(accelerator, wrapped, optimizer, groups, pad_id, cfg.grad_clip)
            schedule.step()
            step, stage_step = step + 1, stage_step + 1
            if log:
                log.write({"stage": f"srt/{stage}", "step": step, "epoch": epoch,
                           "loss": accelerator.reduce(loss.detach(), "mean").item(),
                           "lr": schedule.get_last_lr()[0], "seconds": time.time() - start,
                           "budget/trained_tokens": trained_tokens})
            if checkpoint_dir and cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(accelerator, checkpoint_dir,
                                {"stage_index": stage_index, "step": step, "stage_step": stage_step,
                                 "trained_tokens": trained_tokens}, model=wrapped, optimizer=optimizer)
            reached(f"srt-step-{step}")
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        finish_trackers(accelerator)
    model.eval()
    check_finite(model, "srt")
    return {"tuples": len(rows), "steps": step, "seconds": time.time() - start, "trained_tokens": trained_tokens}


def _stages(schedule: str, rows: list[dict], examples: list) -> list[tuple[str, list]]:
    """(stage, its examples) in training order: "joint" on every tuple, or "generation" on the tuples whose first
    answer was wrong, then "revision" on every tuple (two_stage)."""
    if schedule == "joint":
        return [("joint", examples)]
    return [("generation", [e for e, row in zip(examples, rows) if row["init_reward"] < 1.0]),
            ("revision", examples)]


def _stage_runtime(model, cfg: SRTConfig, n_examples: int, out_dir, log_config):
    """A fresh runtime per stage: each stage has its own optimiser and schedule (two_stage). Returns the
    accelerator, the metrics log (None without out_dir), the prepared model and optimiser, the schedule and the
    stage's total steps."""
    accelerator = make_accelerator(out_dir, log_config)
    log = MetricsLog(Path(out_dir) / "metrics.jsonl", accelerator) if out_dir else None
    total = -(-n_examples // cfg.batch_size) * cfg.epochs
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    schedule = make_schedule(optimizer, warmup_steps=max(1, int(cfg.warmup_ratio * total)), total_steps=total)
    wrapped, optimizer = prepare(accelerator, model, optimizer)
    accelerator.register_for_checkpointing(schedule)
    return accelerator, log, wrapped, optimizer, schedule, total


def _first_stage_start(accelerator, log, checkpoint_dir: Path | None, wrapped, optimizer, resume: bool,
                       resume_stage: int | None) -> tuple[int, int, int]:
    """(step, stage_step, trained_tokens) where the first stage this call trains starts: the checkpoint's when
    there is one to resume from, else 0. The log keeps the steps up to there, or a fresh run starts a fresh log."""
    step = stage_step = trained_tokens = 0
    if resume_stage is not None:
        state = load_checkpoint(accelerator, checkpoint_dir, wrapped, optimizer)
        step, stage_step = state["step"], state["stage_step"]
        trained_tokens = state.get("trained_tokens", 0)  # the budget so far, counted once
    elif resume and checkpoint_dir:
        accelerator.print(f"no checkpoint in {checkpoint_dir}: SRT starts from step 0")
    if log and resume:
        log.drop_after(step)  # the steps after the checkpoint are redone
    elif log and log.main and log.path.exists():
        log.path.unlink()  # a fresh run starts a fresh log
    return step, stage_step, trained_tokens


def _batches(n_examples: int, cfg: SRTConfig, seed: int, stage_step: int, rank: int, world: int):
    """(epoch, the indices of this process's examples, those of the whole batch) of each step of a stage from
    `stage_step` on. The data order is replayed from the seed (the epochs of skipped steps are shuffled too), so a
    resumed run sees the batches it would have seen."""
    rng = random.Random(seed)
    steps_per_epoch = -(-n_examples // cfg.batch_size)
    for epoch in range(cfg.epochs):
        order = list(range(n_examples))
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            if epoch * steps_per_epoch + i // cfg.batch_size < stage_step:
                continue
            # This process's slice of the batch (a process left without one repeats the batch's first).
            yield epoch, order[i:i + cfg.batch_size][rank::world] or order[i:i + 1], order[i:i + cfg.batch_size]


def _trained_tokens(stage: str, batch: list) -> int:
    """Budget: tokens of the whole batch (all processes) that go through forward and backward."""
    return sum(len(context) + len(target) for group in _loss_groups(stage, batch) for context, target in group)


def _loss_groups(stage: str, batch: list) -> list[list[tuple[list[int], list[int]]]]:
    """The (context, target) groups whose mean NLLs the stage's loss sums: L_revision, L_generation or both."""
    revision, generation = [b[0] for b in batch], [b[1] for b in batch]
    return {"joint": [revision, generation], "generation": [generation], "revision": [revision]}[stage]
