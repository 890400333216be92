"""What a Phase 2 (SD-Zero self-distillation) step costs next to an SFT step: time and peak memory.

Both steps are the trainer's own code, called through its public functions on one fixed batch: the Phase 2 step is
`sdzero.distill.train_step` on a run object made by `sdzero.distill.set_up` (as `distill` makes it: the frozen
teacher copy, the accelerator, AdamW) with rollouts made by `sdzero.distill.sample_rollouts`; the SFT step is
`sdzero.srt.srt_step` (SRT's optimiser step) on prompt + response of the same answers. Figures, each printed as a
`name: value` line (benchmarks/README.md explains them):

1. Step time: the steps run interleaved, A, B, A, B, ..., on the same model and optimiser; medians of wall time and
   of the process's CPU time (the steadier of the two on a shared machine), then extra runs split by forward hooks
   into the teacher's forward, the student's forward and the rest.
2. Peak memory of each step, each in a fresh child process: live tensor bytes from torch's allocator records, and
   the rise of the process's peak RSS.
3. Step time and memory again on a larger random lab-architecture model with long synthetic multi-attempt
   responses, then step time alone at other response lengths on that model.

The batch: real rollouts of the shipped lab model on lab problems, or with `--model smollm2-135m-instruct` of that
model on reasoning-gym problems (`--source`, `--options`, `--answer-rule`). `--reference` adds a reference step
written out in this file (not the trainer's code): full-vocabulary logits at every position. `--micro-batch N`
also times the trainer's step in micro-batches of N. `--quick` is a smoke run; `--help` lists every option.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

from common import (MB, ForwardClock, ModelSpec, apply_sizes, begin, build, interleaved, median, model_spec,
                    n_params, problems, report, reward_function, sized_parser,
                    spaced)  # first: it sets the environment torch reads when it loads
import torch
from memory import in_child, measure, methods, warm_up_runtime

from sdzero import lab
from sdzero.distill import DistillConfig, Phase2, Rollouts, micro_batch_tensors, sample_rollouts, set_up, train_step
from sdzero.generation import Sample, SamplingConfig
from sdzero.lab.task import sample_problems, write_solution
from sdzero.losses import self_distillation_loss
from sdzero.prompts import SEPARATOR, ControlPhrases, end_of_turn_ids, generator_prompt_ids
from sdzero.srt import SRTConfig, srt_step
from sdzero.tasks.lab import lab_reward
from sdzero.training import gather_positions, make_accelerator, make_optimizer, prepare

FULL = dict(reps=5, warmup=1, batch=32, max_new_tokens=160, long_batch=8, long_response_tokens=300, memory_steps=2)
QUICK = dict(reps=2, warmup=1, batch=8, max_new_tokens=48, long_batch=2, long_response_tokens=120, memory_steps=1)
SIZES = {
    "reps": "timed repetitions of each step (interleaved A, B, A, B, ...; medians reported)",
    "warmup": "untimed interleaved repetitions before the timed ones",
    "batch": "rollouts in the fixed batch (one micro-batch, as distill does when micro_batch_size >= "
             "prompts_per_step)",
    "max_new_tokens": "longest sampled response of the fixed batch",
    "long_batch": "sequences in the fixed batch of the larger-model comparison",
    "long_response_tokens": "length of each synthetic multi-attempt response in the larger-model comparison, "
                            "end-of-turn token included",
    "memory_steps": "training steps run in each memory-measurement child process",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = sized_parser(__doc__, FULL, QUICK, SIZES)
    p.add_argument("--long-hidden", type=int, default=256, help="hidden size of the larger random lab model "
                                                                "(default: %(default)s)")
    p.add_argument("--long-layers", type=int, default=6, help="its layers (default: %(default)s)")
    p.add_argument("--long-heads", type=int, default=4, help="its attention heads (default: %(default)s)")
    p.add_argument("--long-vocab", type=int, default=0,
                   help="pad the larger model's embedding and LM head to this many rows, to see full-vocabulary "
                        "logits cost (default: %(default)s = the lab tokenizer's 320)")
    p.add_argument("--sweep-response-tokens", default=None,
                   help="comma-separated extra response lengths timed (steps only, compact output) on the larger "
                        "model; '' to skip (full run: 100,200, --quick: 60)")
    p.add_argument("--reference", "--plain", dest="reference", action="store_true",
                   help="also time and measure a reference step written in this file, not the trainer's: "
                        "full-vocabulary logits at every position, gathered afterwards")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="also time the trainer's Phase 2 step in micro-batches of this many rollouts "
                        "(default: %(default)s = off)")
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--skip-long", action="store_true", help="skip the larger-model comparison")
    args = p.parse_args(argv)
    apply_sizes(args, FULL, QUICK)
    if args.sweep_response_tokens is None:
        args.sweep_response_tokens = "60" if args.quick else "100,200"
    try:
        args.sweep = [int(x) for x in args.sweep_response_tokens.split(",") if x.strip()]
    except ValueError:
        p.error("--sweep-response-tokens takes comma-separated integers")
    return args


# ----------------------------------------------------------------------------------------------------------
# The fixed batch and the trainer's objects


@dataclass
class Batch:
    """One fixed batch of answers, as plain data so it can be sent to a child process."""

    rows: list[dict]
    answers: list[Sample] | None  # None: sample them with the trainer's generator
    verifier: Callable  # (completion, row) -> reward


class FixedAnswers:
    """A sampler for `distill.set_up` that gives back the batch's answers, so the same answers go through the
    trainer's own `sample_rollouts` (scoring, teacher layouts) in every process without sampling again."""

    def __init__(self, answers: list[Sample], sampling: SamplingConfig):
        self.answers, self.sampling, self.synced_gpus = answers, sampling, False

    def sample(self, contexts: list[list[int]], n: int = 1, **_) -> list[list[Sample]]:
        assert n == 1 and len(contexts) == len(self.answers), "the fixed batch answers its own problems only"
        return [[answer] for answer in self.answers]

    def refresh(self, model) -> None:
        pass


def phase2_run(model, tokenizer, batch: Batch, args) -> tuple[Phase2, Rollouts]:
    """The trainer's Phase 2 run object (`distill.set_up`) and the batch's rollouts (`distill.sample_rollouts`):
    one step of all the batch's prompts in one micro-batch; without answers, sampled by the trainer's generator."""
    size = len(batch.rows)
    cfg = DistillConfig(prompts_per_step=size, micro_batch_size=size, max_steps=1, lr=args.lr, warmup_steps=0,
                        top_k=args.top_k or None)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, batch_size=size,
                              backend="transformers")
    sampler = FixedAnswers(batch.answers, sampling) if batch.answers else None
    run = set_up(model, tokenizer, batch.rows, batch.verifier, ControlPhrases(), sampling, cfg, teacher=None,
                 out_dir=None, system_prompt=None, log_config=None, generator=sampler, diagnostics=None)
    torch.manual_seed(args.seed)
    return run, sample_rollouts(run, batch.rows)


def sampled_batch(spec: ModelSpec, args) -> Batch:
    """Real Phase 2 rollouts: training problems, one answer each from the model, temperature 1.0."""
    model, tokenizer = build(spec)
    batch = Batch(problems(args, args.batch, args.seed), None, reward_function(args))
    _, rollouts = phase2_run(model, tokenizer, batch, args)
    return replace(batch, answers=rollouts.samples)


def synthetic_batch(tokenizer, size: int, response_tokens: int, seed: int) -> Batch:
    """Long responses made like the lab corpus: attempts, each wrong one followed by "start over" and a new
    attempt, cut at `response_tokens` - 1 tokens, then the end-of-turn token. Every other one ends on a right
    attempt when it is long enough to hold one, so both control phrases (bridges) occur."""
    phrases, eot = ControlPhrases(), end_of_turn_ids(tokenizer)
    rng = random.Random(seed)
    rows, answers = [], []
    for i, problem in enumerate(sample_problems(size, split="train", seed=seed + 1, min_digits=7, max_digits=7)):
        parts = [write_solution(problem, rng, slip_rate=1.0)]
        while len(tokenizer.encode(SEPARATOR.join(parts), add_special_tokens=False)) < response_tokens:
            parts += [phrases.wrong, write_solution(problem, rng, slip_rate=1.0)]
        ids = tokenizer.encode(SEPARATOR.join(parts), add_special_tokens=False)[:response_tokens - 1]
        tail = tokenizer.encode(SEPARATOR + phrases.wrong + SEPARATOR + write_solution(problem),
                                add_special_tokens=False)
        if i % 2 and len(tail) < len(ids):  # end this one on a right attempt (same length)
            ids = ids[:len(ids) - len(tail)] + tail
        ids = ids + [tokenizer.eos_token_id]
        rows.append(problem.to_row())
        answers.append(Sample(ids, tokenizer.decode(ids, skip_special_tokens=True), finished=ids[-1] in eot))
    return Batch(rows, answers, lab_reward)


def sft_step(accelerator, model, optimizer, tokenizer, batch: Batch) -> Callable[[], object]:
    """SRT's optimiser step (`srt.srt_step`) on prompt + response of the batch's answers, labels on the response:
    the tokens the Phase 2 student reads (Phase 2 cuts an answer only past the teacher's context limit)."""
    examples = [(generator_prompt_ids(tokenizer, row["problem"]), list(answer.ids))
                for row, answer in zip(batch.rows, batch.answers)]
    model.train()  # as train_srt does before its steps
    return partial(srt_step, accelerator, model, optimizer, [examples], tokenizer.pad_token_id, SRTConfig().grad_clip)


def reference_step(run: Phase2, rollouts: Rollouts) -> None:
    """REFERENCE, written here and not the trainer's code: the Phase 2 step without the trainer's fast path, to
    compare against. Both models compute full-vocabulary logits at every position and the target rows are gathered
    afterwards; the loss is `losses.self_distillation_loss` on them; one micro-batch, no per-step counters."""
    cfg, accelerator = run.cfg, run.accelerator
    layouts = [layout for layout in rollouts.layouts if layout is not None]
    s_ids, s_att, t_ids, t_att, s_pos, t_pos, mask = micro_batch_tensors(layouts, run.tokenizer.pad_token_id,
                                                                         accelerator.device)
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad(), accelerator.autocast():
        teacher_logits = gather_positions(run.teacher(input_ids=t_ids, attention_mask=t_att).logits, t_pos)
    student_logits = gather_positions(run.model(input_ids=s_ids, attention_mask=s_att).logits, s_pos)
    loss = self_distillation_loss(student_logits, teacher_logits, mask, divergence=cfg.divergence, top_k=cfg.top_k,
                                  mixed_weight=cfg.mixed_weight, tail_bucket=cfg.tail_bucket)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()


def step_variants(run: Phase2, rollouts: Rollouts, batch: Batch, args, detail: bool) -> dict[str, Callable]:
    variants = {"sft": sft_step(run.accelerator, run.model, run.optimizer, run.tokenizer, batch),
                "phase2": partial(train_step, run, rollouts)}
    if args.reference:
        variants["reference_full_logits"] = partial(reference_step, run, rollouts)
    if args.micro_batch and detail:
        micro = replace(run, cfg=replace(run.cfg, micro_batch_size=args.micro_batch))
        variants[f"phase2_micro{args.micro_batch}"] = partial(train_step, micro, rollouts)
    return variants


# ----------------------------------------------------------------------------------------------------------
# 1. Interleaved step timing, and where the time goes


def breakdown(run: Phase2, steps: dict[str, Callable], rounds: int) -> dict[str, dict[str, float]]:
    """Medians over extra runs of each step (not part of the timed ones) of its time in the teacher's forward, in
    the student's forward, and in the rest (top-k, loss, backward, clipping, optimiser step, counters)."""
    runs = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            clock = ForwardClock({"teacher_forward": run.teacher.model, "student_forward": run.student})
            start = clock.now()
            step()
            total = clock.now() - start
            clock.close()
            runs[name].append({**clock.seconds, "rest": total - sum(clock.seconds.values()), "total": total})
    return {name: {part: median([r[part] for r in rs]) for part in rs[0]} for name, rs in runs.items()}


def describe(prefix: str, model, spec: ModelSpec, batch: Batch, rollouts: Rollouts) -> None:
    """The model, and the batch's sizes and padding (right padding: the share of the padded [B, L] grid that holds
    no real token), and the full-vocabulary float32 logits a step would create against the rows the loss reads."""
    layouts = [layout for layout in rollouts.layouts if layout is not None]
    student = [len(l.student_ids) for l in layouts]
    teacher = [len(l.teacher_ids) for l in layouts]
    responses = [len(a.ids) for a in batch.answers]
    report(f"{prefix}batch_sequences", len(batch.rows))
    report(f"{prefix}batch_prompt_tokens_mean", statistics.mean(s - len(l.student_positions)
                                                                for s, l in zip(student, layouts)))
    report(f"{prefix}batch_response_tokens_mean", statistics.mean(responses))
    report(f"{prefix}batch_response_tokens_min_max", f"{min(responses)} {max(responses)}")
    report(f"{prefix}batch_student_tokens", sum(student))
    report(f"{prefix}batch_teacher_tokens", sum(teacher))
    report(f"{prefix}batch_target_tokens", sum(l.n_targets for l in layouts))
    report(f"{prefix}batch_reward_mean", statistics.mean(r for r in rollouts.rewards if r is not None))
    report(f"{prefix}sft_padding_share", 1 - sum(student) / (max(student) * len(student)))
    report(f"{prefix}phase2_teacher_padding_share", 1 - sum(teacher) / (max(teacher) * len(teacher)))
    report(f"{prefix}model", spec.describe())
    report(f"{prefix}model_parameters", n_params(model))
    report(f"{prefix}model_weights_mb", sum(p.numel() * p.element_size() for p in model.parameters()) / MB)
    vocab, rows = model.config.vocab_size, len(layouts)
    report(f"{prefix}vocab_size", vocab)
    report(f"{prefix}phase2_teacher_logits_mb", rows * max(teacher) * vocab * 4 / MB)
    report(f"{prefix}phase2_student_logits_mb", rows * max(student) * vocab * 4 / MB)
    report(f"{prefix}phase2_target_logits_mb", rows * max(l.n_targets for l in layouts) * vocab * 4 / MB)


def time_steps(spec: ModelSpec, batch: Batch, args, prefix: str, detail: bool = True) -> None:
    model, tokenizer = build(spec)
    run, rollouts = phase2_run(model, tokenizer, batch, args)
    layouts = [layout for layout in rollouts.layouts if layout is not None]
    teacher_tokens = sum(len(l.teacher_ids) for l in layouts)
    student_tokens = sum(len(l.student_ids) for l in layouts)
    if detail:
        describe(prefix, model, spec, batch, rollouts)
    else:
        report(f"{prefix}batch_teacher_tokens", teacher_tokens)
    # The ~5/3 floor for this batch: SFT = forward + backward = 3 units on the padded student grid; Phase 2 adds a
    # teacher forward of (padded teacher grid / padded student grid) units, attention's growth ignored.
    widest = max(len(l.teacher_ids) for l in layouts) / max(len(l.student_ids) for l in layouts)
    report(f"{prefix}phase2_over_sft_floor", 1 + widest / 3)
    variants = step_variants(run, rollouts, batch, args, detail)
    wall, cpu = interleaved(variants, args.reps, args.warmup)
    for clock, times in (("", wall), ("cpu_", cpu)):
        for name, values in times.items():
            report(f"{prefix}{name}_step_{clock}s", median(values))
        for name, values in times.items():
            if name != "sft":
                report(f"{prefix}{name}_over_sft_step_{clock}ratio", median(values) / median(times["sft"]))
    if detail:
        for clock, times in (("", wall), ("cpu_", cpu)):
            for name, values in times.items():
                report(f"{prefix}{name}_step_{clock}s_all", spaced(values))
        targets = sum(l.n_targets for l in layouts)
        for name in ("sft", "phase2"):
            report(f"{prefix}{name}_target_tokens_per_s", targets / median(wall[name]))
    parts = breakdown(run, {name: variants[name] for name in ("sft", "phase2")}, max(1, min(args.reps, 3)))
    if detail:
        for name, seconds in parts.items():
            for part, value in seconds.items():
                if value or part != "teacher_forward":
                    report(f"{prefix}{name}_breakdown_{part}_s", value)
    p2 = parts["phase2"]
    report(f"{prefix}phase2_teacher_forward_share", p2["teacher_forward"] / p2["total"])
    report(f"{prefix}teacher_over_student_forward_per_token",
           (p2["teacher_forward"] / teacher_tokens) / (p2["student_forward"] / student_tokens))


# ----------------------------------------------------------------------------------------------------------
# 2. Peak memory, one fresh child process per measurement


def memory_of(spec: ModelSpec, batch: Batch, variant: str, method: str, args) -> tuple[float | None, str]:
    """Peak memory of `args.memory_steps` steps of one variant (run in a child), above a baseline that already holds
    what every variant shares: imported code, the warmed-up runtime and the student model. Whatever the steps add
    counts: the accelerator, gradients, AdamW state, activations, logits, and for Phase 2 also the frozen teacher
    copy, made inside the measured window as distill() makes it (`set_up`)."""
    torch.set_num_threads(args.threads)
    model, tokenizer = build(spec)
    warm_up_runtime(model, batch.answers[0].ids[:8])

    def work() -> None:
        if variant == "sft":  # what train_srt sets up before its steps
            accelerator = make_accelerator()
            wrapped, optimizer = prepare(accelerator, model, make_optimizer(model, args.lr))
            step = sft_step(accelerator, wrapped, optimizer, tokenizer, batch)
        else:
            run, rollouts = phase2_run(model, tokenizer, batch, args)
            step = partial(train_step if variant == "phase2" else reference_step, run, rollouts)
        for _ in range(args.memory_steps):
            step()

    return measure(method, work)


def peak_memory(spec: ModelSpec, batch: Batch, args, prefix: str) -> None:
    for method, suffix in methods().items():
        results = {}
        for variant in ("sft", "phase2") + (("reference_full_logits",) if args.reference else ()):
            value, why = in_child(memory_of, spec, batch, variant, method, args)
            results[variant] = value if value is not None else f"unavailable ({why})"
        for variant, value in results.items():
            report(f"{prefix}{variant}_{suffix}", value)
        for variant in results:
            if variant == "sft":
                continue
            ok = all(isinstance(results[v], float) and results[v] > 0 for v in ("sft", variant))
            report(f"{prefix}{variant}_over_sft_{suffix.replace('_mb', '')}_ratio",
                   results[variant] / results["sft"] if ok else "unavailable")
    report(f"{prefix}memory_steps", args.memory_steps)


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    began = begin(args)
    report("reps", args.reps)
    report("top_k", args.top_k or "full vocabulary")

    # Same model, same tokens: real rollouts of the model (the shipped lab model, or --model) on training problems.
    spec = model_spec(args)
    batch = sampled_batch(spec, args)
    time_steps(spec, batch, args, "")
    if not args.skip_memory:
        peak_memory(spec, batch, args, "")

    if not args.skip_long:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(lab.BASE_MODEL_DIR)  # a lab-architecture model, the lab tokenizer
        longest = max([args.long_response_tokens, *args.sweep])
        spec = ModelSpec("random", hidden=args.long_hidden, layers=args.long_layers, heads=args.long_heads,
                         max_positions=max(2048, 2 * longest + 512),  # room for prompt + y + bridge + y
                         vocab=args.long_vocab, seed=args.seed)
        long_batch = synthetic_batch(tokenizer, args.long_batch, args.long_response_tokens, args.seed)
        time_steps(spec, long_batch, args, "long_")
        if not args.skip_memory:
            peak_memory(spec, long_batch, args, "long_")
        # The same larger model at other response lengths: how the ratio moves with length alone.
        for tokens in args.sweep:
            sweep_batch = synthetic_batch(tokenizer, args.long_batch, tokens, args.seed)
            time_steps(spec, sweep_batch, args, f"sweep{tokens}_", detail=False)

    report("total_runtime_s", time.perf_counter() - began)


if __name__ == "__main__":
    sys.exit(main())
