"""Phase 2: on-policy self-distillation of the reviser back into the generator.

Each step, for a batch of prompts x from N2:
  1. the student samples ONE answer y per prompt and the verifier scores it (r in {0, 1});
  2. the frozen teacher reads prompt(x) + y + sep + P_r + sep + y in one assistant turn;
  3. at every token of y, the student's next-token distribution (given x, y_<t) is pulled towards
     the teacher's distribution for the same token of the second copy (given x, y, P_r, y_<t):
     L = mean over tokens of D(student || teacher) on the teacher's top-k support.
Right and wrong answers are both trained on; only P_r differs. An answer no reward function could judge
(reward None) is left out of the step and counted (sdzero/no_reward).

The teacher reads the whole first copy of y, always: that is the context the reviser was trained on
in Phase 1. Around the step, the loop holds only the schedule: the held-out curve every `eval_every`
steps, keep-best (the result is the student of the best tracked evaluation), teacher refreshes
(every N steps, on a plateau, or gated: only after a consolidated gain with no runaway lengths),
checkpoints to resume from, and every `rollouts_every` steps the step's rollouts in rollouts.jsonl.
"""

from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from tqdm.auto import tqdm

from sdzero.checks import check_ranges
from sdzero.errors import Refusal
from sdzero.generation import Sample, SamplingConfig, make_generator, own_random_state
from sdzero.lab.task import PROBLEM_PREFIX, Problem, gold_digits
from sdzero.losses import DIVERGENCES, per_token_divergence, teacher_topk
from sdzero.prompts import (OVERFLOW, ControlPhrases, DistillLayout, bridge_ids, distill_layout, end_of_turn_ids,
                            generator_prompt_ids, token_pieces)
from sdzero.modeling import Teacher, max_positions
from sdzero.training import (LogConfig, MetricsLog, check_finite, finish_trackers, full_weights, is_fsdp2,
                             load_checkpoint, logits_at, make_accelerator, make_optimizer, make_schedule, pad_right,
                             prepare, save_checkpoint, unwrap)
from sdzero.rewards import Verifier


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
    """Longest teacher context (prompt + y + bridge + y); None: the teacher's position limit
    (`max_position_embeddings`). The first copy of y is never cut; see `overflow`."""
    overflow: str = "truncate"
    """A sample longer than teacher_max_length: "truncate" trains on the prefix of y that fits in the
    second copy, "mask" leaves the sample out. Either way it is counted (sdzero/truncated, sdzero/masked_out)."""
    eval_every: int | None = None
    """Evaluate the student every N steps and after the last one (learning curve, keep-best, refresh rules)."""
    keep_best: bool = True
    """With eval_every: the stage's result is the student of the best tracked evaluation, not the last one
    (the official release keeps its best checkpoints by validation accuracy)."""
    sync_every: int | None = None
    """Self-evolution: copy the student into the teacher every N steps (None: frozen teacher)."""
    sync_patience: int | None = None
    """Self-evolution: copy the student into the teacher when the tracked accuracy has not improved
    for this many evaluations (needs eval_every)."""
    refresh_margin: float | None = None
    """Gated refresh: copy the student into the teacher at an evaluation where the tracked accuracy beats
    the accuracy at the last refresh (or at step 0) by at least this much and the response-length tail has
    not grown (needs eval_every; None: off)."""
    refresh_tail_growth: float = 0.1
    """Gated refresh: the tail (90th percentile of rollout lengths since the last evaluation) may be at most
    this fraction longer than the tail of the teacher's own answers (the rollouts of the first step after
    the last refresh)."""
    save_every: int | None = 50
    """Write a checkpoint to resume from (model, optimiser, scheduler, RNG, step, teacher) every N steps."""
    rollouts_every: int | None = 10
    """Append the step's rollouts to rollouts.jsonl every N steps (None: never): per rollout its prompt id,
    response text, token count, whether it finished, reward, and a summary of the per-token divergence the
    step computed (mean, max, and the positions of the largest tokens). Nothing is recomputed and nothing is
    drawn. Measured on CPU (lab model, ~80-token answers): 1.5 ms per recorded step of 32 rollouts (0.08% of
    the step), 4.7 ms at 128 (0.07%); about 400 bytes per rollout."""

    def validate(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise Refusal(f"unknown divergence {self.divergence!r}; choose one of {', '.join(DIVERGENCES)}")
        if self.top_k is not None and self.top_k < 1:
            raise Refusal(f"top_k must be >= 1 or None (full vocabulary), got {self.top_k}")
        if self.overflow not in OVERFLOW:
            raise Refusal(f"unknown overflow rule {self.overflow!r}; choose one of {', '.join(OVERFLOW)}")
        if self.sync_patience is not None and not self.eval_every:
            raise Refusal("sync_patience needs eval_every: the plateau is judged on the evaluations")
        if self.refresh_margin is not None and not self.eval_every:
            raise Refusal("refresh_margin needs eval_every: the gate is judged on the evaluations")
        check_ranges("distill", self, {
            "prompts_per_step": ">= 1", "micro_batch_size": ">= 1", "max_steps": ">= 1", "lr": "> 0",
            "warmup_steps": ">= 0", "grad_clip": "> 0", "mixed_weight": "in [0, 1]", "teacher_max_length": ">= 1",
            "eval_every": ">= 1", "sync_every": ">= 1", "sync_patience": ">= 1", "refresh_margin": ">= 0",
            "refresh_tail_growth": ">= 0", "save_every": ">= 1", "rollouts_every": ">= 1"})


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
    every `cfg.eval_every` steps and after the last (on the main process); with `cfg.keep_best` the
    student ends with the weights of its best evaluation. With `out_dir`, metrics go to
    out_dir/metrics.jsonl and a checkpoint to out_dir/checkpoint every `cfg.save_every` steps;
    `resume=True` continues from that checkpoint. `generator` (default: one made from `sampling`) draws
    the rollouts; it is refreshed with the student's weights after every optimiser step. Returns a
    summary with the evaluation history, the best step and the steps at which the teacher was refreshed.
    """
    cfg.validate()
    if not problems:
        raise Refusal("Phase 2 needs at least one prompt; the problem set is empty")
    teacher = teacher if isinstance(teacher, Teacher) else Teacher(student, teacher)
    cfg = replace(cfg, teacher_max_length=teacher_context_limit(cfg.teacher_max_length,
                                                                max_positions(teacher.model or student)))
    check_teacher_room(tokenizer, problems, phrases, cfg.teacher_max_length, system_prompt)
    accelerator = make_accelerator(out_dir, log_config)
    rank, world = accelerator.process_index, accelerator.num_processes
    optimizer = make_optimizer(student, cfg.lr)
    schedule = make_schedule(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps, kind="constant")
    model, optimizer = prepare(accelerator, student, optimizer)  # model: student, or its distributed wrapper
    accelerator.register_for_checkpointing(schedule)
    if teacher.model is not None:
        teacher.model.to(accelerator.device)
    device = accelerator.device
    pad_id = tokenizer.pad_token_id
    eot = end_of_turn_ids(tokenizer)
    sharded = world > 1 and (is_fsdp2(model) or
                             accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED))
    if generator is None:
        generator = make_generator(student, tokenizer, sampling)
    # Sharded models decode in lockstep: every process runs each decoding step until all are done.
    generator.synced_gpus = sharded
    log = MetricsLog(Path(out_dir) / "metrics.jsonl", accelerator) if out_dir else None
    checkpoint_dir = Path(out_dir) / "checkpoint" if out_dir else None
    rollouts_path = Path(out_dir) / ROLLOUTS_FILE if out_dir and cfg.rollouts_every else None
    bridges = {r: bridge_ids(tokenizer, phrases, r) for r in (0.0, 1.0)}
    # Every process draws the same prompt order and takes its own slice of each step's prompts.
    rng = random.Random(seed)
    queue: list[int] = []
    progress_state = {"step": 0, "teacher_version": 0, "syncs": [], "history": [], "best": None, "best_step": None,
                      "evals_since_best": 0, "refresh": {"accuracy": None, "tail": None, "lengths": []},
                      "budget": {"generations": 0, "sampled_tokens": 0, "trained_tokens": 0}}
    best_weights = None  # the trainable weights of the best tracked evaluation (keep-best)
    if resume:
        if checkpoint_dir is None:
            raise Refusal("resume needs out_dir, where the checkpoint lives")
        state = load_checkpoint(accelerator, checkpoint_dir, model, optimizer)
        if state is None:
            accelerator.print(f"no checkpoint in {checkpoint_dir}: Phase 2 starts from step 0")
        else:
            progress_state.update({k: state[k] for k in progress_state if k in state})
            queue = state["queue"]
            rng.setstate((state["rng"][0], tuple(state["rng"][1]), state["rng"][2]))
            folder = Path(state["folder"])
            if state["teacher_version"] > 0:
                # read into CPU memory, copied onto the teacher's device (torch.load cannot map onto "cpu:0")
                teacher.model.load_state_dict(torch.load(folder / "teacher.pt", map_location="cpu"))
            if (folder / "best.pt").exists():
                best_weights = torch.load(folder / "best.pt")
            if log:
                log.drop_after(progress_state["step"])
    elif log and log.main and log.path.exists():
        log.path.unlink()  # a fresh run starts a fresh log
    if rollouts_path and accelerator.is_main_process:
        drop_rollouts_after(rollouts_path, progress_state["step"])  # a fresh run keeps none, a resumed one its own
    syncs, history, refresh = progress_state["syncs"], progress_state["history"], progress_state["refresh"]
    generator.refresh(student)  # the starting (or resumed) weights
    start = time.time()

    def track(step: int) -> None:
        nonlocal best_weights
        # Sharded weights are gathered layer by layer as the model runs, so every process must take part.
        # On random states of its own: whether and how often it evaluates changes nothing the training draws.
        with own_random_state():
            accuracy = evaluate_fn(student) if accelerator.is_main_process or sharded else None
        accuracy = broadcast_object_list([accuracy])[0]
        history.append({"step": step, "accuracy": accuracy, "teacher_version": progress_state["teacher_version"]})
        if log:
            log.write({"stage": "distill", "step": step, "eval/accuracy": accuracy})
        if progress_state["best"] is None or accuracy > progress_state["best"]:
            progress_state.update(best=accuracy, best_step=step, evals_since_best=0)
            if cfg.keep_best:
                best_weights = trainable_weights(accelerator, model, sharded)
        else:
            progress_state["evals_since_best"] += 1
        if cfg.sync_patience is not None and progress_state["evals_since_best"] >= cfg.sync_patience:
            sync(step)
            progress_state["evals_since_best"] = 0
        if cfg.refresh_margin is not None:
            if refresh["accuracy"] is None:
                refresh["accuracy"] = accuracy  # the teacher's own accuracy, at step 0
            # the main process's rollouts judge the tail, so every process takes the same decision
            elif broadcast_object_list([refresh_gate_open(accuracy, refresh, cfg)])[0]:
                sync(step)
                refresh["accuracy"] = accuracy
            refresh["lengths"] = []

    def sync(step: int) -> None:
        # The student's full weights: under FSDP / ZeRO-3 they are gathered from the shards (on every process).
        teacher.load(gathered_weights(accelerator, model), from_main_process=sharded)
        progress_state["teacher_version"] += 1
        syncs.append(step)
        refresh["tail"] = None  # measured again on the new teacher's answers

    def save(step: int) -> None:
        state = dict(progress_state, step=step, queue=queue, rng=list(rng.getstate()))
        tensors = {"teacher": teacher.state_dict()} if progress_state["teacher_version"] > 0 else {}
        if best_weights is not None:
            tensors["best"] = best_weights
        save_checkpoint(accelerator, checkpoint_dir, state, tensors, model=model, optimizer=optimizer)

    tracking = bool(evaluate_fn and cfg.eval_every)
    if tracking and progress_state["step"] == 0:
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
        rollouts = sample_rollouts(generator, tokenizer, batch[rank::world], verifier, bridges, eot, cfg,
                                   system_prompt)
        recording = rollouts_path is not None and step % cfg.rollouts_every == 0
        stats, grad_norm = train_step(model, teacher, optimizer, accelerator, rollouts, pad_id, cfg, world,
                                      summarise=recording)
        if recording:
            write_rollouts(rollouts_path, step, batch[rank::world], rollouts, tokenizer, accelerator)
        if stats[TOKENS]:
            generator.refresh(student)
        schedule.step()

        budget = progress_state["budget"]  # Phase 2's sample budget, cumulative
        budget["generations"] += int(stats[ROLLOUTS])
        budget["sampled_tokens"] += int(stats[LENGTH])
        budget["trained_tokens"] += int(stats[TRAINED])
        lengths = [len(y.ids) for y in rollouts.samples]
        refresh["lengths"] += lengths
        if refresh["tail"] is None:
            refresh["tail"] = length_tail(lengths)
        record = {"stage": "distill", "step": step, **step_metrics(stats), "sdzero/grad_norm": grad_norm,
                  "sdzero/teacher_version": progress_state["teacher_version"], "lr": schedule.get_last_lr()[0],
                  "seconds": time.time() - start, **{f"budget/{key}": value for key, value in budget.items()}}
        if log:
            log.write(record)
        bar.set_postfix(reward=f"{record['sdzero/reward']:.2f}", kl=f"{record['sdzero/kl']:.4f}")
        if cfg.sync_every and step % cfg.sync_every == 0:
            sync(step)
        if tracking and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            track(step)
        progress_state["step"] = step
        if checkpoint_dir and cfg.save_every and step % cfg.save_every == 0:
            save(step)
    if cfg.keep_best and best_weights is not None and progress_state["best_step"] != progress_state["step"]:
        load_trainable_weights(accelerator, model, best_weights, sharded)
        generator.refresh(student)
        accelerator.print(f"keep-best: the result is the student of step {progress_state['best_step']} "
                          f"(tracked accuracy {progress_state['best']:.3f})")
    student.eval()
    finish_trackers(accelerator)
    check_finite(student, "distill")
    return {"steps": cfg.max_steps, "history": history, "syncs": syncs, "best_step": progress_state["best_step"],
            "best_accuracy": progress_state["best"], "teacher_version": progress_state["teacher_version"],
            "seconds": time.time() - start, **progress_state["budget"]}


@dataclass
class Rollouts:
    """One step's rollouts on this process: the answers, their rewards and their Phase 2 layouts."""

    samples: list[Sample]
    rewards: list[float]
    layouts: list[DistillLayout | None]
    """None where the sample is masked out (it does not fit the teacher's context, or it has no reward)."""
    gold: list[list[tuple[int, int]]]
    """Lab task only: (target index, token id of the correct digit) for the digits of each answer."""
    divergence: list[dict | None] = field(default_factory=list)
    """Filled by `train_step(summarise=True)`: per rollout, `divergence_summary` of its per-token loss
    terms (None where the sample was not trained on)."""


def teacher_context_limit(max_length: int | None, positions: int | None) -> int | None:
    """The teacher's longest context: `max_length` (distill.teacher_max_length), or without one the
    teacher's position limit `positions` (`modeling.max_positions`).

    A limit past the teacher's positions is refused: a rotary model runs there without an error but was
    never trained to read that far, so its targets would silently degrade."""
    if max_length is None:
        return positions
    if positions is not None and max_length > positions:
        raise Refusal(f"distill.teacher_max_length={max_length} is past the teacher's {positions} positions "
                         f"(max_position_embeddings): set it to {positions} or less, or leave it unset")
    return max_length


def check_teacher_room(tokenizer, problems: list[dict], phrases: ControlPhrases, max_length: int | None,
                       system_prompt: str | None) -> None:
    """Refuse a teacher_max_length that no sample could fit (every sample masked, nothing trained): the
    teacher reads the prompt, the whole first answer and P_r, and needs room for one target after them."""
    if max_length is None:
        return
    shortest = (min(len(generator_prompt_ids(tokenizer, p["problem"], system_prompt)) for p in problems)
                + min(len(bridge_ids(tokenizer, phrases, r)) for r in (0.0, 1.0)) + 1)
    if max_length < shortest:
        raise Refusal(f"distill.teacher_max_length={max_length} is too short for any sample: the shortest "
                         f"prompt with P_r and a one-token answer already takes {shortest} tokens")


def sample_rollouts(generator, tokenizer, problems: list[dict], verifier: Verifier, bridges: dict, eot: set[int],
                    cfg: DistillConfig, system_prompt: str | None) -> Rollouts:
    """One answer per prompt from the current student, its reward, and the teacher's context: P_r follows
    from the reward, so right and wrong answers differ only in the phrase the teacher reads."""
    prompts = [generator_prompt_ids(tokenizer, p["problem"], system_prompt) for p in problems]
    samples = [answers[0] for answers in generator.sample(prompts, 1, progress=False)]
    rewards = Verifier.of(verifier).score(samples, problems, generator.sampling)
    layouts = [distill_layout(prompt, y.ids, bridges[r], eot, cfg.teacher_max_length, cfg.overflow)
               if r is not None else None for prompt, y, r in zip(prompts, samples, rewards)]
    gold = [lab_gold_tokens(tokenizer, y, p) if layout else [] for y, p, layout in zip(samples, problems, layouts)]
    return Rollouts(samples, rewards, layouts, gold)


def lab_gold_tokens(tokenizer, sample: Sample, problem: dict) -> list[tuple[int, int]]:
    """For a lab problem, (index in y, token id) of the correct digit at every step digit of y; else []."""
    if not str(problem.get("problem", "")).startswith(PROBLEM_PREFIX):
        return []
    _, _, offsets = token_pieces(tokenizer, sample.ids)
    token_at = {start: t for t, (start, end) in enumerate(offsets) if end == start + 1}  # one-character tokens
    digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    return [(token_at[char], digit_ids[digit]) for char, digit in gold_digits(sample.text, Problem.from_row(problem))
            if char in token_at]


def train_step(model, teacher: Teacher, optimizer, accelerator, rollouts: Rollouts, pad_id: int, cfg: DistillConfig,
               world: int, summarise: bool = False) -> tuple[list[float], float]:
    """One optimiser step of L = mean over the step's target tokens of D(student || teacher); returns the
    step's counters (summed over processes) and the gradient norm. With `summarise`, also fills
    `rollouts.divergence` from the per-token values the step computed."""
    device = accelerator.device
    rollouts.divergence = [None] * len(rollouts.samples)
    kept = [i for i, layout in enumerate(rollouts.layouts) if layout is not None]
    # Similar lengths share a micro-batch, so less of each padded batch is padding.
    kept.sort(key=lambda i: len(rollouts.layouts[i].teacher_ids))
    # The loss is the mean over every target token of the step, across all processes.
    n_tokens = accelerator.reduce(torch.tensor(float(sum(rollouts.layouts[i].n_targets for i in kept)),
                                               device=device)).item()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    stats = torch.zeros(STATS, device=device)
    grad_norm = 0.0
    if n_tokens:
        # Every process runs the same number of backward passes, so gradient averaging stays in step.
        per_process = -(-cfg.prompts_per_step // world)
        n_micro = -(-per_process // cfg.micro_batch_size)
        for m in range(n_micro):
            micro = kept[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size]
            with nullcontext() if m == n_micro - 1 else accelerator.no_sync(model):
                if not micro:  # this process has fewer samples: join the gradient average with zero
                    accelerator.backward(model(input_ids=torch.tensor([[pad_id]], device=device)).logits.sum() * 0)
                    continue
                layouts = [rollouts.layouts[i] for i in micro]
                per_token, diagnostics = micro_batch_divergence(model, teacher, layouts, pad_id, device, cfg,
                                                                autocast=accelerator.autocast)
                accelerator.backward(per_token.sum() / n_tokens * world)
                add_micro_batch_stats(stats, per_token.detach(), diagnostics, layouts,
                                      [rollouts.rewards[i] for i in micro], [rollouts.gold[i] for i in micro])
                if summarise:
                    values = per_token.detach().float().cpu()  # one copy per micro-batch
                    for row, (i, layout) in enumerate(zip(micro, layouts)):
                        rollouts.divergence[i] = divergence_summary(values[row, :layout.n_targets])
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
    stats[REWARD] = sum(r for r in rollouts.rewards if r is not None)
    stats[NO_REWARD] = sum(r is None for r in rollouts.rewards)
    stats[ROLLOUTS] = len(rollouts.samples)
    stats[UNFINISHED] = sum(not y.finished for y in rollouts.samples)
    stats[LENGTH] = sum(len(y.ids) for y in rollouts.samples)
    stats[TRUNCATED] = sum(1 for l in rollouts.layouts if l is not None and l.truncated)
    stats[MASKED] = sum(1 for l in rollouts.layouts if l is None) - stats[NO_REWARD]
    stats[TRAINED] = sum(len(rollouts.layouts[i].student_ids) for i in kept) if n_tokens else 0
    return accelerator.reduce(stats).tolist(), grad_norm


ROLLOUTS_FILE = "rollouts.jsonl"
TOP_POSITIONS = 5  # tokens of largest divergence named per rollout in rollouts.jsonl


def divergence_summary(values: torch.Tensor) -> dict | None:
    """Mean and max of one rollout's per-token divergence, and the positions in y of its largest values
    (largest first); None for a rollout with no target token."""
    if not values.numel():
        return None
    top = torch.topk(values, min(TOP_POSITIONS, values.numel())).indices.tolist()
    return {"mean": values.mean().item(), "max": values.max().item(), "top_positions": top}


def rollout_rows(step: int, problems: list[dict], rollouts: Rollouts, tokenizer) -> list[dict]:
    """rollouts.jsonl's lines for one process's rollouts of a step; the largest-divergence tokens are also
    given as text, so a line reads on its own."""
    rows = []
    for problem, sample, reward, layout, summary in zip(problems, rollouts.samples, rollouts.rewards,
                                                        rollouts.layouts, rollouts.divergence):
        if summary is not None:
            summary = {**summary, "top_tokens": [tokenizer.decode([sample.ids[t]]) for t in summary["top_positions"]]}
        rows.append({"step": step, "id": problem.get("id"), "response": sample.text, "tokens": len(sample.ids),
                     "finished": sample.finished, "reward": reward,
                     "truncated": layout is not None and layout.truncated, "divergence": summary})
    return rows


def write_rollouts(path: Path, step: int, problems: list[dict], rollouts: Rollouts, tokenizer, accelerator) -> None:
    """Append the step's rollouts of every process to `path` (every process must call it)."""
    rows = gather_object(rollout_rows(step, problems, rollouts, tokenizer))
    if accelerator.is_main_process:
        with path.open("a") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)


def drop_rollouts_after(path: Path, step: int) -> None:
    """Forget the rollouts of steps after `step`, and a line a killed run cut short (a resumed run redoes them)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines(keepends=True)
             if line.endswith("\n") and json.loads(line)["step"] <= step]
    path.write_text("".join(lines))


# Per-step counters summed across processes (indices into one tensor, so one reduction per step).
(REWARD, ROLLOUTS, UNFINISHED, LENGTH, TRUNCATED, MASKED, TRAINED, TOKENS, KL_WRONG, TOKENS_WRONG, KL_RIGHT,
 TOKENS_RIGHT, ENTROPY, TOPK_MASS, GOLD_HITS, GOLD_DIGITS, NO_REWARD) = range(17)
STATS = NO_REWARD + 1


def add_micro_batch_stats(stats: torch.Tensor, per_token: torch.Tensor, diagnostics: dict, layouts, rewards,
                          gold) -> None:
    mask = diagnostics["mask"]
    per_sample = per_token.sum(1)
    wrong = torch.tensor([r < 1.0 for r in rewards], device=per_token.device)
    lengths = mask.sum(1).float()
    stats[TOKENS] += lengths.sum()
    stats[KL_WRONG] += per_sample[wrong].sum()
    stats[TOKENS_WRONG] += lengths[wrong].sum()
    stats[KL_RIGHT] += per_sample[~wrong].sum()
    stats[TOKENS_RIGHT] += lengths[~wrong].sum()
    stats[ENTROPY] += diagnostics["entropy"][mask].sum()
    stats[TOPK_MASS] += diagnostics["topk_mass"][mask].sum()
    teacher_top = diagnostics["teacher_top"].tolist()
    for row, (layout, digits) in enumerate(zip(layouts, gold)):
        in_targets = [(t, token) for t, token in digits if t < layout.n_targets]
        stats[GOLD_HITS] += sum(teacher_top[row][t] == token for t, token in in_targets)
        stats[GOLD_DIGITS] += len(in_targets)


def step_metrics(stats: list[float]) -> dict:
    """metrics.jsonl's per-step figures from the step's counters."""
    tokens = max(1.0, stats[TOKENS])
    kl = (stats[KL_WRONG] + stats[KL_RIGHT]) / tokens
    metrics = {
        "loss": kl, "sdzero/kl": kl,
        "sdzero/reward": stats[REWARD] / max(1.0, stats[ROLLOUTS] - stats[NO_REWARD]),
        "sdzero/no_reward": int(stats[NO_REWARD]),  # rollouts left out: no reward function gave a value
        "sdzero/kl_wrong": stats[KL_WRONG] / max(1.0, stats[TOKENS_WRONG]),
        "sdzero/kl_right": stats[KL_RIGHT] / max(1.0, stats[TOKENS_RIGHT]),
        "sdzero/response_len": stats[LENGTH] / stats[ROLLOUTS],
        "sdzero/unfinished": stats[UNFINISHED] / stats[ROLLOUTS],
        "sdzero/truncated": int(stats[TRUNCATED]),
        "sdzero/masked_out": int(stats[MASKED]),
        "sdzero/entropy": stats[ENTROPY] / tokens,
        # the renormalised top-k loss cannot see the student's mass outside the teacher's top-k
        "sdzero/student_topk_mass": stats[TOPK_MASS] / tokens,
    }
    if stats[GOLD_DIGITS]:
        metrics["sdzero/teacher_gold_agreement"] = stats[GOLD_HITS] / stats[GOLD_DIGITS]
    return metrics


def length_tail(lengths: list[int]) -> float:
    """The 90th percentile of response lengths: the part of the distribution that runs away first."""
    ordered = sorted(lengths)
    return float(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]) if ordered else 0.0


def refresh_gate_open(accuracy: float, refresh: dict, cfg: DistillConfig) -> bool:
    """Gated teacher refresh: the student has consolidated a real gain since the last refresh, and its
    answers are not running long (a drifting student copied into the teacher cannot be undone)."""
    if refresh["tail"] is None or not refresh["lengths"]:  # no answers of this teacher's to compare with yet
        return False
    gained = accuracy >= refresh["accuracy"] + cfg.refresh_margin
    tail_held = length_tail(refresh["lengths"]) <= (1.0 + cfg.refresh_tail_growth) * refresh["tail"]
    return gained and tail_held


def gathered_weights(accelerator, model) -> dict:
    """The full weights of a distributed model, gathered on the main process (every process must call it)."""
    return full_weights(model) if is_fsdp2(model) else accelerator.get_state_dict(model)


def trainable_weights(accelerator, model, sharded: bool) -> dict:
    """A CPU copy of the weights training changes (all of them for a sharded model, gathered on the main process)."""
    if sharded:
        return {name: tensor.cpu() for name, tensor in gathered_weights(accelerator, model).items()}
    return {name: p.detach().to("cpu", copy=True) for name, p in unwrap(model).named_parameters() if p.requires_grad}


def load_trainable_weights(accelerator, model, weights: dict, sharded: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # a copy: the broadcast replaces the dict's values with the model's shards
        set_model_state_dict(model, dict(weights),
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return
    unknown = unwrap(model).load_state_dict(weights, strict=False).unexpected_keys
    if unknown:
        raise Refusal(f"keep-best: weights not in the model: {unknown[:3]}")


def micro_batch_divergence(model, teacher: Teacher, layouts: list[DistillLayout], pad_id: int, device,
                           cfg: DistillConfig, autocast=nullcontext) -> tuple[torch.Tensor, dict]:
    """Per-token divergence [B, T] (zero past each sample's end) between student and teacher on one
    micro-batch, and per-token diagnostics (no gradient): the student's entropy, its mass on the
    teacher's top-k, the teacher's most likely token, and the target mask.

    Both models project onto the vocabulary only at the target positions, and the teacher keeps only its
    top-k log-probs. `autocast` is the student's (accelerate's): the teacher computes at the same
    precision, so teacher = student gives zero divergence on the same context."""
    (s_ids, s_att, t_ids, t_att, s_pos, t_pos, mask) = micro_batch_tensors(layouts, pad_id, device)
    with torch.no_grad(), autocast():
        teacher_logprobs, teacher_indices = teacher_topk(logits_at(teacher, t_ids, t_att, t_pos), cfg.top_k)
    student_logits = logits_at(model, s_ids, s_att, s_pos)
    per_token = per_token_divergence(student_logits, teacher_logprobs, teacher_indices,
                                     divergence=cfg.divergence, mixed_weight=cfg.mixed_weight,
                                     tail_bucket=cfg.tail_bucket)
    with torch.no_grad():
        student_logprobs = torch.log_softmax(student_logits.detach().float(), dim=-1)
        diagnostics = {
            "mask": mask,
            "entropy": -(student_logprobs.exp() * student_logprobs).sum(-1),
            "topk_mass": student_logprobs.gather(-1, teacher_indices).exp().sum(-1),
            "teacher_top": teacher_indices.gather(-1, teacher_logprobs.argmax(-1, keepdim=True)).squeeze(-1),
        }
    return torch.where(mask, per_token, torch.zeros_like(per_token)), diagnostics
