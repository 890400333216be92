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

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import DistributedType, broadcast_object_list
from tqdm.auto import tqdm

from sdzero.generation import SamplingConfig, make_generator
from sdzero.losses import DIVERGENCES, per_token_divergence, teacher_topk
from sdzero.prompts import (ControlPhrases, DistillLayout, bridge_ids, distill_layout, end_of_turn_ids,
                            generator_prompt_ids)
from sdzero.modeling import Teacher
from sdzero.training import (LogConfig, MetricsLog, finish_trackers, load_checkpoint, logits_at, make_accelerator,
                             make_optimizer, make_schedule, pad_right, save_checkpoint)
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
    """Linear warm-up steps, then a constant learning rate (official: 20)."""
    grad_clip: float = 1.0
    """Gradient norm clipping (official: 1.0)."""
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
    save_every: int | None = 50
    """Write a checkpoint to resume from (model, optimiser, scheduler, RNG, step, teacher) every N steps."""

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
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def distill(student, tokenizer, problems: list[dict], verifier: Verifier, phrases: ControlPhrases,
            sampling: SamplingConfig, cfg: DistillConfig, *, teacher=None, out_dir: str | Path | None = None,
            seed: int = 0, evaluate_fn: Callable[[object], float] | None = None,
            system_prompt: str | None = None, progress: bool = True, resume: bool = False,
            log_config: LogConfig | None = None, generator=None) -> dict:
    """Train `student` in place. Without `teacher`, the teacher is a frozen copy of the starting student
    (or, for a LoRA student, the student with its adapter switched off).

    Runs in every process of `accelerate launch`: each process samples its share of the step's
    prompts, and gradients are averaged across processes. `evaluate_fn(model) -> accuracy` is called
    every `cfg.eval_every` steps (on the main process). With `out_dir`, metrics go to
    out_dir/metrics.jsonl and a checkpoint to out_dir/checkpoint every `cfg.save_every` steps;
    `resume=True` continues from that checkpoint. `generator` (default: one made from `sampling`) draws
    the rollouts; it is refreshed with the student's weights after every optimiser step. Returns a
    summary with the evaluation history and the steps at which the teacher was synchronised.
    """
    cfg.validate()
    if not problems:
        raise ValueError("Phase 2 needs at least one prompt; the problem set is empty")
    teacher = teacher if isinstance(teacher, Teacher) else Teacher(student, teacher)
    accelerator = make_accelerator(out_dir, log_config)
    rank, world = accelerator.process_index, accelerator.num_processes
    optimizer = make_optimizer(student, cfg.lr)
    schedule = make_schedule(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps, kind="constant")
    model, optimizer = accelerator.prepare(student, optimizer)  # model: student, or its distributed wrapper
    accelerator.register_for_checkpointing(schedule)
    if teacher.model is not None:
        teacher.model.to(accelerator.device)
    device = accelerator.device
    pad_id = tokenizer.pad_token_id
    eot = end_of_turn_ids(tokenizer)
    sharded = world > 1 and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if generator is None:
        generator = make_generator(student, tokenizer, sampling)
    # Sharded models decode in lockstep: every process runs each decoding step until all are done.
    generator.synced_gpus = sharded
    log = MetricsLog(Path(out_dir) / "metrics.jsonl", accelerator) if out_dir else None
    checkpoint_dir = Path(out_dir) / "checkpoint" if out_dir else None
    bridges = {r: bridge_ids(tokenizer, phrases, r) for r in (0.0, 1.0)}
    # Every process draws the same prompt order and takes its own slice of each step's prompts.
    rng = random.Random(seed)
    queue: list[int] = []
    progress_state = {"step": 0, "teacher_version": 0, "syncs": [], "history": [], "best": None,
                      "evals_since_best": 0, "budget": {"generations": 0, "sampled_tokens": 0, "trained_tokens": 0}}
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume needs out_dir, where the checkpoint lives")
        state = load_checkpoint(accelerator, checkpoint_dir)
        if state is None:
            accelerator.print(f"no checkpoint in {checkpoint_dir}: Phase 2 starts from step 0")
        else:
            progress_state.update({k: state[k] for k in progress_state if k in state})
            queue = state["queue"]
            rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
            if state["teacher_version"] > 0:
                teacher.model.load_state_dict(torch.load(Path(state["folder"]) / "teacher.pt", map_location=device))
            if log:
                log.drop_after(progress_state["step"])
    elif log and log.main and log.path.exists():
        log.path.unlink()  # a fresh run starts a fresh log
    syncs, history = progress_state["syncs"], progress_state["history"]
    generator.refresh(student)  # the starting (or resumed) weights
    start = time.time()

    def track(step: int) -> None:
        # Sharded weights are gathered layer by layer as the model runs, so every process must take part.
        accuracy = evaluate_fn(student) if accelerator.is_main_process or sharded else None
        accuracy = broadcast_object_list([accuracy])[0]
        history.append({"step": step, "accuracy": accuracy, "teacher_version": progress_state["teacher_version"]})
        if log:
            log.write({"stage": "distill", "step": step, "eval/accuracy": accuracy})
        if progress_state["best"] is None or accuracy > progress_state["best"]:
            progress_state["best"], progress_state["evals_since_best"] = accuracy, 0
        else:
            progress_state["evals_since_best"] += 1
        if cfg.sync_patience is not None and progress_state["evals_since_best"] >= cfg.sync_patience:
            sync(step)
            progress_state["evals_since_best"] = 0

    def sync(step: int) -> None:
        # The student's full weights: under FSDP / ZeRO-3 they are gathered from the shards (on every process).
        teacher.load(accelerator.get_state_dict(model), from_main_process=sharded)
        progress_state["teacher_version"] += 1
        syncs.append(step)

    def save(step: int) -> None:
        state = dict(progress_state, step=step, queue=queue, rng=list(rng.getstate()))
        tensors = {"teacher": teacher.state_dict()} if progress_state["teacher_version"] > 0 else None
        save_checkpoint(accelerator, checkpoint_dir, state, tensors)

    if evaluate_fn and cfg.eval_every and progress_state["step"] == 0:
        track(0)
    first_step = progress_state["step"] + 1
    bar = tqdm(range(first_step, cfg.max_steps + 1), desc="distill", initial=first_step - 1, total=cfg.max_steps,
               disable=not progress or not accelerator.is_main_process)
    for step in bar:
        # Walk through N2 in a fresh random order each epoch.
        batch = []
        while len(batch) < cfg.prompts_per_step:
            if not queue:
                queue = rng.sample(range(len(problems)), len(problems))
            batch.append(problems[queue.pop()])
        batch = batch[rank::world]
        prompts = [generator_prompt_ids(tokenizer, p["problem"], system_prompt) for p in batch]
        rollouts = [samples[0] for samples in generator.sample(prompts, 1, progress=False)]
        rewards = [verifier(y.text, p) for y, p in zip(rollouts, batch)]
        layouts = [distill_layout(prompt, y.ids, bridges[r], eot, cfg.teacher_max_length)
                   for prompt, y, r in zip(prompts, rollouts, rewards)]
        kept = [(layout, r) for layout, r in zip(layouts, rewards) if layout is not None and layout.n_targets]
        # Similar lengths share a micro-batch, so less of each padded batch is padding.
        kept.sort(key=lambda item: len(item[0].teacher_ids))
        # The loss is the mean over every target token of the step, across all processes.
        n_tokens = accelerator.reduce(torch.tensor(float(sum(l.n_targets for l, _ in kept)), device=device)).item()

        model.train()
        optimizer.zero_grad(set_to_none=True)
        stats = torch.zeros(STATS, device=device)
        if n_tokens:
            # Every process runs the same number of backward passes, so gradient averaging stays in step.
            per_process = -(-cfg.prompts_per_step // world)
            n_micro = -(-per_process // cfg.micro_batch_size)
            for i in range(n_micro):
                micro = kept[i * cfg.micro_batch_size:(i + 1) * cfg.micro_batch_size]
                with nullcontext() if i == n_micro - 1 else accelerator.no_sync(model):
                    if not micro:  # this process has fewer samples: join the gradient average with zero
                        accelerator.backward(model(input_ids=torch.tensor([[pad_id]], device=device)).logits.sum() * 0)
                        continue
                    per_token = micro_batch_divergence(model, teacher, micro, pad_id, device, cfg)
                    accelerator.backward(per_token.sum() / n_tokens * world)
                    per_sample = per_token.detach().sum(1)
                    wrong = torch.tensor([r < 1.0 for _, r in micro], device=device)
                    lengths = torch.tensor([float(l.n_targets) for l, _ in micro], device=device)
                    stats[KL_WRONG] += per_sample[wrong].sum()
                    stats[TOKENS_WRONG] += lengths[wrong].sum()
                    stats[KL_RIGHT] += per_sample[~wrong].sum()
                    stats[TOKENS_RIGHT] += lengths[~wrong].sum()
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            optimizer.step()
            generator.refresh(student)
        else:
            grad_norm = 0.0
        schedule.step()

        stats[REWARD] = sum(rewards)
        stats[ROLLOUTS] = len(rollouts)
        stats[LENGTH] = sum(len(y.ids) for y in rollouts)
        stats[TRUNCATED] = sum(1 for l in layouts if l is not None and l.truncated)
        stats[MASKED] = sum(1 for l in layouts if l is None)
        stats[TRAINED] = sum(len(l.student_ids) for l, _ in kept) if n_tokens else 0
        stats = accelerator.reduce(stats).tolist()
        budget = progress_state["budget"]  # Phase 2's sample budget, cumulative
        budget["generations"] += int(stats[ROLLOUTS])
        budget["sampled_tokens"] += int(stats[LENGTH])
        budget["trained_tokens"] += int(stats[TRAINED])
        kl = (stats[KL_WRONG] + stats[KL_RIGHT]) / max(1.0, n_tokens)
        record = {
            "stage": "distill", "step": step, "loss": kl,
            "sdzero/reward": stats[REWARD] / stats[ROLLOUTS],
            "sdzero/kl": kl,
            "sdzero/kl_wrong": stats[KL_WRONG] / max(1.0, stats[TOKENS_WRONG]),
            "sdzero/kl_right": stats[KL_RIGHT] / max(1.0, stats[TOKENS_RIGHT]),
            "sdzero/response_len": stats[LENGTH] / stats[ROLLOUTS],
            "sdzero/truncated": int(stats[TRUNCATED]),
            "sdzero/masked_out": int(stats[MASKED]),
            "sdzero/teacher_version": progress_state["teacher_version"],
            "sdzero/grad_norm": grad_norm, "lr": schedule.get_last_lr()[0], "seconds": time.time() - start,
            **{f"budget/{key}": value for key, value in budget.items()},
        }
        if log:
            log.write(record)
        bar.set_postfix(reward=f"{record['sdzero/reward']:.2f}", kl=f"{kl:.4f}")
        if cfg.sync_every and step % cfg.sync_every == 0:
            sync(step)
        if evaluate_fn and cfg.eval_every and step % cfg.eval_every == 0:
            track(step)
        progress_state["step"] = step
        if checkpoint_dir and cfg.save_every and step % cfg.save_every == 0:
            save(step)
    student.eval()
    finish_trackers(accelerator)
    return {"steps": cfg.max_steps, "history": history, "syncs": syncs,
            "teacher_version": progress_state["teacher_version"], "seconds": time.time() - start,
            **progress_state["budget"]}


# Per-step counters summed across processes (indices into one tensor, so one reduction per step).
REWARD, ROLLOUTS, LENGTH, TRUNCATED, MASKED, KL_WRONG, TOKENS_WRONG, KL_RIGHT, TOKENS_RIGHT, TRAINED = range(10)
STATS = TRAINED + 1


def micro_batch_divergence(model, teacher: Teacher, micro: list[tuple[DistillLayout, float]], pad_id: int, device,
                           cfg: DistillConfig) -> torch.Tensor:
    """Per-token divergence [B, T] (zero past each sample's end) between student and teacher on one micro-batch.

    Both models project onto the vocabulary only at the target positions, and the teacher keeps only its
    top-k log-probs."""
    (s_ids, s_att, t_ids, t_att, s_pos, t_pos, mask) = micro_batch_tensors([m[0] for m in micro], pad_id, device)
    with torch.no_grad():
        teacher_logprobs, teacher_indices = teacher_topk(logits_at(teacher, t_ids, t_att, t_pos), cfg.top_k)
    student_logits = logits_at(model, s_ids, s_att, s_pos)
    per_token = per_token_divergence(student_logits, teacher_logprobs, teacher_indices,
                                     divergence=cfg.divergence, mixed_weight=cfg.mixed_weight,
                                     tail_bucket=cfg.tail_bucket)
    return torch.where(mask, per_token, torch.zeros_like(per_token))
