"""Phase 2: on-policy self-distillation of the reviser back into the generator.

Each step, for a batch of prompts x from N2:
  1. the student samples ONE answer y per prompt and the verifier scores it (r in {0, 1});
  2. the frozen teacher reads prompt(x) + y + sep + P_r + sep + y in one assistant turn;
  3. at every token of y, the student's next-token distribution (given x, y_<t) is pulled towards
     the teacher's distribution for the same token of the second copy (given x, y, P_r, y_<t):
     L = mean over tokens of D(student || teacher) on the teacher's top-k support.
Right and wrong answers are both trained on; only P_r differs. An answer no reward function could judge
(reward None) is left out of the step and counted (sdzero/no_reward). The teacher reads the whole first
copy of y, always: the context the reviser was trained on in Phase 1.

Around the step, the loop holds only the schedule (its rules: `sdzero.phase2_rules`): the held-out curve
every `eval_every` steps, keep-best (the result is the student of the best tracked evaluation), teacher
refreshes (every N steps, on a plateau, or gated: after a consolidated gain with no runaway lengths),
checkpoints to resume from, and every `rollouts_every` steps the step's rollouts in rollouts.jsonl.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import DistributedType, broadcast_object_list
from tqdm.auto import tqdm

from sdzero.checks import check_ranges
from sdzero.errors import Refusal
from sdzero.generation import Sample, SamplingConfig, make_generator, own_random_state
from sdzero.losses import DIVERGENCES, per_token_divergence, teacher_topk
from sdzero.prompts import (OVERFLOW, ControlPhrases, DistillLayout, bridge_ids, distill_layout, end_of_turn_ids,
                            generator_prompt_ids)
from sdzero.modeling import Teacher, max_positions
from sdzero.phase2_io import (ROLLOUTS_FILE, PromptOrder, divergence_summary, drop_rollouts_after, gathered_weights,
                              load_phase2, load_trainable_weights, save_phase2, trainable_weights, write_rollouts)
from sdzero.phase2_rules import Progress
from sdzero.phase2_stats import StepStats
from sdzero.training import (LogConfig, MetricsLog, check_finite, finish_trackers, is_fsdp2, logits_at,
                             make_accelerator, make_optimizer, make_schedule, pad_right, prepare, reached)
from sdzero.rewards import Verifier

Diagnostics = Callable[[object, Sample, dict], list[tuple[int, int]]]
"""diagnostics(tokenizer, sample, problem) -> [(index in y, right token id)] where the task knows the right token
(lab: `lab.diagnostics.gold_digit_tokens`); each step reports how often it is the teacher's top token there."""


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
    first_copy_keeps_end: bool = False
    """Keep y's end-of-turn token in the teacher's first copy (official code; off: the paper's layout, as SRT's
    reviser reads y). Without it a copying teacher predicts the bridge where y ends (docs/real.md, SmolLM2)."""
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


def distill(student, tokenizer, problems: list[dict], verifier: Verifier, phrases: ControlPhrases,
            sampling: SamplingConfig, cfg: DistillConfig, *, teacher=None, out_dir: str | Path | None = None,
            seed: int = 0, evaluate_fn: Callable[[object], float] | None = None,
            system_prompt: str | None = None, progress: bool = True, resume: bool = False,
            log_config: LogConfig | None = None, generator=None, diagnostics: Diagnostics | None = None) -> dict:
    """Train `student` in place. Without `teacher`, the teacher is a frozen copy of the starting student (or, for a
    LoRA student, the student with its adapter switched off).

    Runs in every process of `accelerate launch`: each process samples its share of the step's prompts, and
    gradients are averaged across processes. `evaluate_fn(model) -> accuracy` is called every `cfg.eval_every` steps
    and after the last (on the main process); with `cfg.keep_best` the student ends with the weights of its best
    evaluation. With `out_dir`, metrics go to out_dir/metrics.jsonl and a checkpoint to out_dir/checkpoint every
    `cfg.save_every` steps; `resume=True` continues from that checkpoint. `generator` (default: one made from
    `sampling`) draws the rollouts; it is refreshed with the student's weights after every optimiser step.
    `diagnostics` adds the task's own check of the teacher's targets. Returns a summary with the evaluation
    history, the best step and the steps at which the teacher was refreshed.
    """
    cfg.validate()
    if not problems:
        raise Refusal("Phase 2 needs at least one prompt; the problem set is empty")
    run = set_up(student, tokenizer, problems, verifier, phrases, sampling, cfg, teacher=teacher, out_dir=out_dir,
                 system_prompt=system_prompt, log_config=log_config, generator=generator, diagnostics=diagnostics)
    cfg, rank, world = run.cfg, run.accelerator.process_index, run.accelerator.num_processes
    order = PromptOrder(len(problems), seed)
    state = start_or_resume(run, order, resume)
    run.generator.refresh(student)  # the starting (or resumed) weights
    start = time.time()
    tracking = bool(evaluate_fn and cfg.eval_every)
    if tracking and state.step == 0:
        evaluate(run, state, evaluate_fn, 0)
    bar = tqdm(range(state.step + 1, cfg.max_steps + 1), desc="distill", initial=state.step, total=cfg.max_steps,
               disable=not progress or not run.accelerator.is_main_process)
    for step in bar:
        batch = [problems[i] for i in order.next_batch(cfg.prompts_per_step)][rank::world]
        rollouts = sample_rollouts(run, batch)
        recording = run.rollouts_path is not None and step % cfg.rollouts_every == 0
        stats = train_step(run, rollouts, summarise=recording)
        if recording:
            write_rollouts(run.rollouts_path, step, batch, rollouts, tokenizer, run.accelerator)
        if stats.tokens:
            run.generator.refresh(student)
        run.schedule.step()
        state.record_step(step, [len(y.ids) for y in rollouts.samples], generations=int(stats.rollouts),
                          sampled_tokens=int(stats.length), trained_tokens=int(stats.trained))
        record = {"stage": "distill", "step": step, **stats.metrics(), "sdzero/teacher_version": state.teacher_version,
                  "lr": run.schedule.get_last_lr()[0], "seconds": time.time() - start,
                  **{f"budget/{key}": value for key, value in asdict(state.budget).items()}}
        if run.log:
            run.log.write(record)
        bar.set_postfix(reward=f"{record['sdzero/reward']:.2f}", kl=f"{record['sdzero/kl']:.4f}")
        if state.refresh_on_clock(step, cfg):
            refresh_teacher(run)
        if tracking and state.eval_due(step, cfg):
            evaluate(run, state, evaluate_fn, step)
        if run.checkpoint_dir and cfg.save_every and step % cfg.save_every == 0:
            save_phase2(run.accelerator, run.checkpoint_dir, state, order, run.teacher, run.best_weights, run.model,
                        run.optimizer)
        reached(f"phase2-step-{step}")
    return finish(run, state, start)


@dataclass
class Phase2:
    """What Phase 2 trains with (the models, how prompts become rollouts, where records go), made by `set_up`."""

    cfg: DistillConfig
    accelerator: object
    student: object
    model: object  # the student, or its distributed wrapper
    optimizer: object
    schedule: object
    teacher: Teacher
    generator: object
    sharded: bool
    tokenizer: object
    verifier: Verifier
    system_prompt: str | None
    bridges: dict[float, list[int]]  # sep + P_r + sep, by reward
    eot: set[int]
    diagnostics: Diagnostics | None
    log: MetricsLog | None
    checkpoint_dir: Path | None
    rollouts_path: Path | None
    best_weights: dict | None = None
    """The trainable weights of the best tracked evaluation (keep-best)."""


def set_up(student, tokenizer, problems, verifier, phrases, sampling, cfg: DistillConfig, *, teacher, out_dir,
           system_prompt, log_config, generator, diagnostics) -> Phase2:
    """The teacher, its context limit (refused if no prompt fits it), the accelerator, the optimiser and schedule."""
    teacher = teacher if isinstance(teacher, Teacher) else Teacher(student, teacher)
    cfg = replace(cfg, teacher_max_length=teacher_context_limit(cfg.teacher_max_length,
                                                                max_positions(teacher.model or student)))
    check_teacher_room(tokenizer, problems, phrases, cfg.teacher_max_length, system_prompt)
    accelerator = make_accelerator(out_dir, log_config)
    optimizer = make_optimizer(student, cfg.lr)
    schedule = make_schedule(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps, kind="constant")
    model, optimizer = prepare(accelerator, student, optimizer)
    accelerator.register_for_checkpointing(schedule)
    if teacher.model is not None:
        teacher.model.to(accelerator.device)
    sharded = accelerator.num_processes > 1 and (
        is_fsdp2(model) or accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED))
    if generator is None:
        generator = make_generator(student, tokenizer, sampling)
    # Sharded models decode in lockstep: every process runs each decoding step until all are done.
    generator.synced_gpus = sharded
    out = Path(out_dir) if out_dir else None
    return Phase2(cfg=cfg, accelerator=accelerator, student=student, model=model, optimizer=optimizer,
                  schedule=schedule, teacher=teacher, generator=generator, sharded=sharded, tokenizer=tokenizer,
                  verifier=Verifier.of(verifier), system_prompt=system_prompt,
                  bridges={r: bridge_ids(tokenizer, phrases, r) for r in (0.0, 1.0)},
                  eot=end_of_turn_ids(tokenizer), diagnostics=diagnostics,
                  log=MetricsLog(out / "metrics.jsonl", accelerator) if out else None,
                  checkpoint_dir=out / "checkpoint" if out else None,
                  rollouts_path=out / ROLLOUTS_FILE if out and cfg.rollouts_every else None)


def start_or_resume(run: Phase2, order: PromptOrder, resume: bool) -> Progress:
    """A fresh start (a fresh log), or the state of the checkpoint (the log and rollouts cut back to its step)."""
    state = Progress()
    if not resume:
        if run.log and run.log.main and run.log.path.exists():
            run.log.path.unlink()
    elif run.checkpoint_dir is None:
        raise Refusal("resume needs out_dir, where the checkpoint lives")
    else:
        loaded = load_phase2(run.accelerator, run.checkpoint_dir, order, run.teacher, run.model, run.optimizer)
        if loaded is None:
            run.accelerator.print(f"no checkpoint in {run.checkpoint_dir}: Phase 2 starts from step 0")
        else:
            state, run.best_weights = loaded
            if run.log:
                run.log.drop_after(state.step)
    if run.rollouts_path and run.accelerator.is_main_process:
        drop_rollouts_after(run.rollouts_path, state.step)  # a fresh run keeps none, a resumed one its own
    return state


def evaluate(run: Phase2, state: Progress, evaluate_fn, step: int) -> None:
    """The tracked evaluation after `step`, and what it decides: keep-best's weights, a teacher refresh."""
    # Sharded weights are gathered layer by layer as the model runs, so every process must take part.
    # On random states of its own: whether and how often it evaluates changes nothing the training draws.
    with own_random_state():
        accuracy = evaluate_fn(run.student) if run.accelerator.is_main_process or run.sharded else None
    accuracy = broadcast_object_list([accuracy])[0]
    if run.cfg.refresh_margin is not None:
        # the main process's rollouts judge the length tail, so every process takes the same decision
        state.refresh = broadcast_object_list([state.refresh])[0]
    decision = state.record_eval(step, accuracy, run.cfg)
    if run.log:
        run.log.write({"stage": "distill", "step": step, "eval/accuracy": accuracy})
    if decision.keep_weights:
        run.best_weights = trainable_weights(run.accelerator, run.model, run.sharded)
    if decision.refresh_teacher:
        refresh_teacher(run)


def refresh_teacher(run: Phase2) -> None:
    """teacher <- the student's full weights (under FSDP / ZeRO-3 gathered from the shards, on every process)."""
    run.teacher.load(gathered_weights(run.accelerator, run.model), from_main_process=run.sharded)


def finish(run: Phase2, state: Progress, start: float) -> dict:
    """Keep-best's weights back into the student, and the stage's summary."""
    if run.cfg.keep_best and run.best_weights is not None and state.ends_on_another_step():
        load_trainable_weights(run.accelerator, run.model, run.best_weights, run.sharded)
        run.generator.refresh(run.student)
        run.accelerator.print(f"keep-best: the result is the student of step {state.best_step} "
                              f"(tracked accuracy {state.best:.3f})")
    run.student.eval()
    finish_trackers(run.accelerator)
    check_finite(run.student, "distill")
    return {"steps": run.cfg.max_steps, "history": state.history, "syncs": state.syncs, "best_step": state.best_step,
            "best_accuracy": state.best, "teacher_version": state.teacher_version, "seconds": time.time() - start,
            **asdict(state.budget)}


@dataclass
class Rollouts:
    """One step's rollouts on this process: the answers, their rewards and their Phase 2 layouts."""

    samples: list[Sample]
    rewards: list[float | None]
    layouts: list[DistillLayout | None]
    """None where the sample is masked out (it does not fit the teacher's context, or it has no reward)."""
    gold: list[list[tuple[int, int]]]
    """(target index, token id) of the tokens `diagnostics` knows to be right, per answer ([] without it)."""
    divergence: list[dict | None] = field(default_factory=list)
    """Per rollout, `divergence_summary` of its loss terms (None: not trained on); `train_step(summarise=True)`."""


def sample_rollouts(run: Phase2, problems: list[dict]) -> Rollouts:
    """One answer per prompt from the current student, its reward, and the teacher's context: P_r follows
    from the reward, so right and wrong answers differ only in the phrase the teacher reads."""
    cfg, tokenizer = run.cfg, run.tokenizer
    prompts = [generator_prompt_ids(tokenizer, p["problem"], run.system_prompt) for p in problems]
    samples = [answers[0] for answers in run.generator.sample(prompts, 1, progress=False)]
    rewards = run.verifier.score(samples, problems, run.generator.sampling)
    layouts = [distill_layout(prompt, y.ids, run.bridges[r], run.eot, cfg.teacher_max_length, cfg.overflow,
                              cfg.first_copy_keeps_end)
               if r is not None else None for prompt, y, r in zip(prompts, samples, rewards)]
    gold = [run.diagnostics(tokenizer, y, p) if run.diagnostics and layout else []
            for y, p, layout in zip(samples, problems, layouts)]
    return Rollouts(samples, rewards, layouts, gold)


def train_step(run: Phase2, rollouts: Rollouts, summarise: bool = False) -> StepStats:
    """One optimiser step of L = mean over the step's target tokens of D(student || teacher); returns the
    step's counters, summed over processes. With `summarise`, also fills `rollouts.divergence` from the
    per-token values the step computed."""
    accelerator = run.accelerator
    rollouts.divergence = [None] * len(rollouts.samples)
    kept = [i for i, layout in enumerate(rollouts.layouts) if layout is not None]
    # Similar lengths share a micro-batch, so less of each padded batch is padding.
    kept.sort(key=lambda i: len(rollouts.layouts[i].teacher_ids))
    # The loss is the mean over every target token of the step, across all processes.
    n_tokens = accelerator.reduce(torch.tensor(float(sum(rollouts.layouts[i].n_targets for i in kept)),
                                               device=accelerator.device)).item()
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    stats = StepStats()
    if n_tokens:
        backward_micro_batches(run, rollouts, kept, n_tokens, stats, summarise)
        stats.grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip).item()
        run.optimizer.step()
    stats.count_rollouts(rollouts, trained=kept if n_tokens else [])
    return stats.summed(accelerator)


def backward_micro_batches(run: Phase2, rollouts: Rollouts, kept: list[int], n_tokens: float, stats: StepStats,
                           summarise: bool) -> None:
    """The step's gradient, one micro-batch of `kept` rollouts at a time; the processes average it at the last."""
    accelerator, cfg, world = run.accelerator, run.cfg, run.accelerator.num_processes
    # Every process runs the same number of backward passes, so gradient averaging stays in step.
    per_process = -(-cfg.prompts_per_step // world)
    n_micro = -(-per_process // cfg.micro_batch_size)
    for m in range(n_micro):
        micro = kept[m * cfg.micro_batch_size:(m + 1) * cfg.micro_batch_size]
        with nullcontext() if m == n_micro - 1 else accelerator.no_sync(run.model):
            if not micro:  # this process has fewer samples: join the gradient average with zero
                pad = torch.tensor([[run.tokenizer.pad_token_id]], device=accelerator.device)
                accelerator.backward(run.model(input_ids=pad).logits.sum() * 0)
                continue
            layouts = [rollouts.layouts[i] for i in micro]
            per_token, token_stats = micro_batch_divergence(run.model, run.teacher, layouts, run.tokenizer.pad_token_id,
                                                            accelerator.device, cfg, autocast=accelerator.autocast)
            accelerator.backward(per_token.sum() / n_tokens * world)
            stats.add_micro_batch(per_token.detach(), token_stats, layouts, [rollouts.rewards[i] for i in micro],
                                  [rollouts.gold[i] for i in micro])
            if summarise:
                values = per_token.detach().float().cpu()  # one copy per micro-batch
                for row, (i, layout) in enumerate(zip(micro, layouts)):
                    rollouts.divergence[i] = divergence_summary(values[row, :layout.n_targets])


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
        token_stats = {
            "mask": mask,
            "entropy": -(student_logprobs.exp() * student_logprobs).sum(-1),
            "topk_mass": student_logprobs.gather(-1, teacher_indices).exp().sum(-1),
            "teacher_top": teacher_indices.gather(-1, teacher_logprobs.argmax(-1, keepdim=True)).squeeze(-1),
        }
    return torch.where(mask, per_token, torch.zeros_like(per_token)), token_stats


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
