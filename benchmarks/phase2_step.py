"""What a Phase 2 (SD-Zero self-distillation) step costs next to an SFT step, and next to GRPO.

Four measurements, each printed as ``name: value`` lines (see benchmarks/README.md for their meaning):

1. Step time on one fixed batch, same model, same tokens. An SFT step (``sdzero.training.sft_step_loss``,
   backward, gradient clipping, AdamW step) and a Phase 2 step without generation (the body of the
   ``sdzero.distill.distill`` loop, built from the same functions the trainer calls: teacher forward under
   ``no_grad`` on prompt + y + bridge + y, student forward and backward, top-k divergence, clipping, AdamW
   step) run interleaved, A, B, A, B, ..., and their medians are compared, in wall time and in the process's
   CPU time (the steadier of the two on a shared machine).
2. Peak memory of the same two steps, each in a fresh child process (multiprocessing "spawn"): the peak of
   live tensor bytes from torch's allocator records, and the rise of the process's peak RSS (see the README).
3. End-to-end Phase 2 samples per second, generation included: ``sdzero.distill.distill`` against TRL's
   ``GRPOTrainer`` on the same model, the same prompts, the same number of generated samples per step and
   the same micro-batch size, in rounds that alternate between the two.
4. Step time and memory again with a larger random lab-architecture model and long synthetic multi-attempt
   responses, then step time alone at other response lengths on that model.

``--model smollm2-135m-instruct`` runs 1-3 on the real model (134.5M parameters, vocabulary 49152) with rollouts on
reasoning-gym problems (``--source``, ``--options``, ``--answer-rule``; default: chain_sum with two one-digit terms,
answers read as the last number, as the model's preset), scored by the generator's own ``score_answer``.

``--plain`` adds, beside the trainer's step, the step as it was before its fast path (full-vocabulary logits at
every position, a full log-softmax before the top-k, a host copy in every micro-batch): before and after, side by
side in one run. ``--micro-batch N`` also times the step in micro-batches of N samples, sorted by length as the
trainer cuts them and in sampling order.

Run ``python benchmarks/phase2_step.py --help`` for the options; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# Quiet third-party chatter before transformers is imported anywhere (children inherit the environment).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Idle OpenMP workers sleep instead of spinning. On a shared machine (or under `nice`) a spinning pool waits on a
# preempted sibling at every parallel region, which made 2-thread CPU steps tens of times slower in testing;
# must be set before torch loads its OpenMP runtime. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from sdzero import lab  # noqa: E402
from sdzero.distill import DistillConfig, micro_batch_divergence, micro_batch_tensors  # noqa: E402
from sdzero.modeling import Teacher  # noqa: E402
from sdzero.lab.task import sample_problems, write_solution  # noqa: E402
from sdzero.losses import per_token_divergence, teacher_topk  # noqa: E402
from sdzero.prompts import (SEPARATOR, ControlPhrases, bridge_ids, distill_layout, end_of_turn_ids,  # noqa: E402
                            generator_prompt_ids)
from sdzero.tasks import reward_function as task_reward  # noqa: E402
from sdzero.tasks.lab import lab_reward  # noqa: E402
from sdzero.training import gather_positions, logits_at, make_optimizer, sft_step_loss  # noqa: E402

MB = 1024 * 1024

# Defaults of a full run, and of a --quick smoke run. An option given on the command line wins over both.
FULL = dict(reps=5, warmup=1, batch=32, max_new_tokens=160, long_batch=8, long_response_tokens=300,
            e2e_steps=3, e2e_rounds=3, e2e_prompts=32, e2e_micro_batch=8, grpo_generations=2, memory_steps=2)
QUICK = dict(reps=2, warmup=1, batch=8, max_new_tokens=48, long_batch=2, long_response_tokens=120,
             e2e_steps=2, e2e_rounds=1, e2e_prompts=8, e2e_micro_batch=4, grpo_generations=2, memory_steps=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Sized options left out take the full-run value, or the --quick value with --quick. "
               "Output: one 'name: value' line per figure; benchmarks/README.md explains each.")

    def sized(name: str, help_text: str) -> None:
        key = name.lstrip("-").replace("-", "_")
        p.add_argument(name, type=int, default=None,
                       help=f"{help_text} (full run: {FULL[key]}, --quick: {QUICK[key]})")

    p.add_argument("--quick", action="store_true",
                   help="smoke run: few repetitions, small batches, short responses")
    sized("--reps", "timed repetitions of each step variant (interleaved A, B, A, B, ...; medians reported)")
    sized("--warmup", "untimed interleaved repetitions before the timed ones")
    sized("--batch", "sequences in the fixed batch of the step comparison on the shipped lab model "
                     "(one micro-batch, as distill does when micro_batch_size >= prompts_per_step)")
    sized("--max-new-tokens", "longest sampled response, for the fixed batch's rollouts and for both "
                              "end-to-end trainers")
    sized("--long-batch", "sequences in the fixed batch of the larger-model comparison")
    sized("--long-response-tokens", "length of each synthetic multi-attempt response in the larger-model "
                                    "comparison, end-of-turn token included")
    sized("--e2e-steps", "optimiser steps of each end-to-end trainer; the first one is a warm-up and is not "
                         "counted, so at least 2")
    sized("--e2e-rounds", "rounds of both end-to-end trainers, alternating, each with its own sampling seed")
    sized("--e2e-prompts", "sdzero prompts per step (one rollout each) = generated samples per step for "
                           "both trainers")
    sized("--e2e-micro-batch", "samples per forward/backward pass in both end-to-end trainers (sdzero "
                               "micro_batch_size, TRL per_device_train_batch_size with gradient accumulation "
                               "over the step's samples); --e2e-prompts gives one pass per step")
    sized("--grpo-generations", "GRPO rollouts per prompt; GRPO gets e2e-prompts / grpo-generations prompts "
                                "per step")
    sized("--memory-steps", "training steps run in each memory-measurement child process")
    p.add_argument("--model", default="lab",
                   help="the model of measurements 1-3: 'lab' (the shipped lab model, lab problems) or a real model "
                        "by name, e.g. smollm2-135m-instruct (reasoning-gym problems; default: %(default)s)")
    p.add_argument("--source", default="reasoning-gym:chain_sum", help="real model: the problems' data.source")
    p.add_argument("--options", default='{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}',
                   help="real model: the generator's options, as JSON (default: %(default)s)")
    p.add_argument("--answer-rule", default="last-number", help="real model: data.answer_rule (default: %(default)s)")
    p.add_argument("--long-hidden", type=int, default=256,
                   help="hidden size of the larger random lab model (default: %(default)s)")
    p.add_argument("--long-layers", type=int, default=6,
                   help="layers of the larger random lab model (default: %(default)s)")
    p.add_argument("--long-heads", type=int, default=4,
                   help="attention heads of the larger random lab model (default: %(default)s)")
    p.add_argument("--long-vocab", type=int, default=0,
                   help="pad the larger model's embedding and LM head to this many rows, to see full-vocabulary "
                        "logits cost (default: %(default)s = the lab tokenizer's 320)")
    p.add_argument("--sweep-response-tokens", default=None,
                   help="comma-separated extra response lengths timed (steps only, compact output) on the larger "
                        "model, beside --long-response-tokens; '' to skip (full run: 100,200, --quick: 60)")
    p.add_argument("--plain", action="store_true",
                   help="also time and measure a third, interleaved variant: the Phase 2 step as it was before its "
                        "fast path (full-vocabulary logits at every position, gathered afterwards)")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="also time the Phase 2 step in micro-batches of this many samples, cut from the samples "
                        "sorted by length (as distill does) and in sampling order (default: %(default)s = off)")
    p.add_argument("--top-k", type=int, default=64, help="teacher top-k support of the Phase 2 loss, 0 = full "
                                                         "vocabulary (default: %(default)s, as DistillConfig)")
    p.add_argument("--lr", type=float, default=5e-6,
                   help="learning rate of every optimiser used here (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads, here and in every child (default: %(default)s); idle OpenMP "
                        "threads sleep (OMP_WAIT_POLICY=PASSIVE) unless OMP_WAIT_POLICY is set")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where models run (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of problems, rollouts and random weights (default: %(default)s)")
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--skip-long", action="store_true", help="skip the larger-model comparison")
    p.add_argument("--skip-e2e", action="store_true", help="skip both end-to-end trainer runs")
    p.add_argument("--grpo-beta", type=float, default=0.0,
                   help="GRPO KL coefficient; > 0 adds TRL's reference-model forward (default: %(default)s, "
                        "TRL's default)")
    p.add_argument("--grpo-gradient-checkpointing", action="store_true",
                   help="GRPO with gradient checkpointing (TRL's default; off here by default because sdzero "
                        "trains without it)")
    p.add_argument("--skip-trl", action="store_true", help="skip the TRL GRPOTrainer run (sdzero's still runs)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.sweep_response_tokens is None:
        args.sweep_response_tokens = "60" if args.quick else "100,200"
    try:
        args.sweep = [int(x) for x in args.sweep_response_tokens.split(",") if x.strip()]
    except ValueError:
        p.error("--sweep-response-tokens takes comma-separated integers")
    if args.e2e_steps < 2:
        p.error("--e2e-steps must be at least 2 (the first step is a warm-up)")
    if args.grpo_generations < 2 or args.e2e_prompts % args.grpo_generations:
        p.error("--grpo-generations must be >= 2 and divide --e2e-prompts")
    if args.e2e_micro_batch < 1 or args.e2e_prompts % args.e2e_micro_batch:
        p.error("--e2e-micro-batch must be >= 1 and divide --e2e-prompts")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    return args


# ----------------------------------------------------------------------------------------------------------
# Output


def report(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    print(f"{name}: {value}", flush=True)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Models and the fixed batch


@dataclass
class ModelSpec:
    """Enough to rebuild the same model in a child process."""

    kind: str  # "lab" (the shipped base model), "named" (a model by name) or "random" (a larger random lab model)
    name: str = "lab"  # kind "named": a name load_model takes (smollm2-135m-instruct, ...)
    hidden: int = 0
    layers: int = 0
    heads: int = 4
    max_positions: int = 2048
    vocab: int = 0  # 0: the lab tokenizer's vocabulary; larger: the embedding/LM head padded to this size
    seed: int = 0

    def describe(self) -> str:
        if self.kind == "lab":
            return "shipped lab base model"
        if self.kind == "named":
            return self.name
        vocab = f", vocabulary padded to {self.vocab}" if self.vocab else ""
        return (f"random lab-architecture model, hidden {self.hidden}, {self.layers} layers, "
                f"{self.heads} heads{vocab}")


def build(spec: ModelSpec, device: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sdzero.lab.model import PretrainConfig, build_model
    from sdzero.pipeline import load_model

    hf_logging.disable_progress_bar()
    if spec.kind in ("lab", "named"):
        return load_model(spec.name, device)
    tokenizer = AutoTokenizer.from_pretrained(lab.BASE_MODEL_DIR)
    torch.manual_seed(spec.seed)
    cfg = PretrainConfig(hidden_size=spec.hidden, num_layers=spec.layers, num_heads=spec.heads,
                         intermediate_size=3 * spec.hidden, max_position_embeddings=spec.max_positions)
    model = build_model(tokenizer, cfg)
    if spec.vocab > model.config.vocab_size:
        # Unused extra rows, as in real models whose LM head is far wider than the lab's 320 tokens.
        model.resize_token_embeddings(spec.vocab, mean_resizing=False)
    return model.to(device).eval(), tokenizer


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Batch:
    """One fixed batch, as plain lists so it can be sent to a child process."""

    examples: list[tuple[list[int], list[int]]]  # (prompt, response): the SFT step's input
    layouts: list  # DistillLayout per sample: the Phase 2 step's input (same prompt, same response)
    rewards: list[float]  # the lab verifier's reward of each response (picks the bridge)
    pad_id: int

    def describe(self, prefix: str) -> None:
        prompts = [len(c) for c, _ in self.examples]
        responses = [len(t) for _, t in self.examples]
        teacher = [len(l.teacher_ids) for l in self.layouts]
        report(f"{prefix}batch_sequences", len(self.examples))
        report(f"{prefix}batch_prompt_tokens_mean", statistics.mean(prompts))
        report(f"{prefix}batch_response_tokens_mean", statistics.mean(responses))
        report(f"{prefix}batch_response_tokens_min_max", f"{min(responses)} {max(responses)}")
        report(f"{prefix}batch_student_tokens", sum(prompts) + sum(responses))
        report(f"{prefix}batch_teacher_tokens", sum(teacher))
        report(f"{prefix}batch_target_tokens", sum(responses))
        report(f"{prefix}batch_reward_mean", statistics.mean(self.rewards))
        # Right padding: share of the padded [B, L] grid that holds no real token.
        width_s = max(p + r for p, r in zip(prompts, responses))
        report(f"{prefix}sft_padding_share", 1 - (sum(prompts) + sum(responses)) / (width_s * len(prompts)))
        report(f"{prefix}phase2_teacher_padding_share", 1 - sum(teacher) / (max(teacher) * len(teacher)))


def main_spec(args) -> ModelSpec:
    """The model of measurements 1-3."""
    return ModelSpec("lab") if args.model == "lab" else ModelSpec("named", name=args.model)


def problems(args, n: int, seed: int) -> list[dict]:
    """`n` training problems for rollouts: lab problems, or the real model's reasoning-gym problems."""
    if args.model == "lab":
        return lab.problem_sets(0, n, 0, seed)[1]
    import json

    from sdzero.data import DataConfig, generated_problem_sets

    data = DataConfig(source=args.source, options=json.loads(args.options), answer_rule=args.answer_rule)
    return generated_problem_sets(data, "reasoning-gym", 0, n, 0, seed).n2


def reward_function(args):
    """(completion, row) -> reward of the problems `problems` gives."""
    return lab_reward if args.model == "lab" else task_reward("reasoning-gym")


def make_batch(prompts: list[list[int]], responses: list[list[int]], rows: list[dict], tokenizer,
               reward=lab_reward) -> Batch:
    phrases = ControlPhrases()
    bridges = {r: bridge_ids(tokenizer, phrases, r) for r in (0.0, 1.0)}
    eot = end_of_turn_ids(tokenizer)
    rewards = [reward(tokenizer.decode(response, skip_special_tokens=True), row)
               for response, row in zip(responses, rows)]
    layouts = [distill_layout(prompt, response, bridges[reward], eot, None)
               for prompt, response, reward in zip(prompts, responses, rewards)]
    return Batch(examples=list(zip(prompts, responses)), layouts=layouts, rewards=rewards,
                 pad_id=tokenizer.pad_token_id)


def sampled_batch(model, tokenizer, args, size: int, max_new_tokens: int, seed: int) -> Batch:
    """Real Phase 2 rollouts: training problems, one sample each from the model, temperature 1.0."""
    from sdzero.generation import Generator, SamplingConfig

    rows = problems(args, size, seed)
    prompts = [generator_prompt_ids(tokenizer, row["problem"]) for row in rows]
    torch.manual_seed(seed)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens, batch_size=max(size, 1))
    samples = Generator(model, tokenizer, sampling).sample(prompts, 1, progress=False)
    return make_batch(prompts, [s[0].ids for s in samples], rows, tokenizer, reward_function(args))


def synthetic_batch(tokenizer, size: int, response_tokens: int, seed: int) -> Batch:
    """Long responses made like the lab corpus: attempts, each wrong one followed by "start over" and a new
    attempt, cut at `response_tokens` - 1 tokens, then the end-of-turn token. Every other one ends on a right
    attempt when it is long enough to hold one, so both control phrases (bridges) occur."""
    phrases = ControlPhrases()
    rng = random.Random(seed)
    problems = sample_problems(size, split="train", seed=seed + 1, min_digits=7, max_digits=7)
    prompts, responses = [], []
    for i, problem in enumerate(problems):
        parts = [write_solution(problem, rng, slip_rate=1.0)]
        while len(tokenizer.encode(SEPARATOR.join(parts), add_special_tokens=False)) < response_tokens:
            parts += [phrases.wrong, write_solution(problem, rng, slip_rate=1.0)]
        ids = tokenizer.encode(SEPARATOR.join(parts), add_special_tokens=False)[:response_tokens - 1]
        tail = tokenizer.encode(SEPARATOR + phrases.wrong + SEPARATOR + write_solution(problem),
                                add_special_tokens=False)
        if i % 2 and len(tail) < len(ids):  # end this one on a right attempt (same length)
            ids = ids[:len(ids) - len(tail)] + tail
        prompts.append(generator_prompt_ids(tokenizer, problem.text))
        responses.append(ids + [tokenizer.eos_token_id])
    return make_batch(prompts, responses, [p.to_row() for p in problems], tokenizer)


# ----------------------------------------------------------------------------------------------------------
# The two steps


class Marks:
    """Optional marks inside a step (for the breakdown). On CPU they read the process's CPU time, which other
    processes on a shared machine disturb far less than the wall clock; on CUDA the wall clock, synchronised
    at each mark."""

    def __init__(self, device: str):
        self.device, self.times, self.last = device, {}, None
        self.clock = time.perf_counter if device == "cuda" else time.process_time

    def start(self) -> None:
        self._sync()
        self.last = self.clock()

    def mark(self, name: str) -> None:
        self._sync()
        now = self.clock()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def sft_step(model, optimizer, batch: Batch, grad_clip: float = 1.0, marks: Marks | None = None) -> float:
    """One SFT optimiser step on prompt + response, labels on the response (as srt.train_srt does)."""
    model.train()
    if marks:
        marks.start()
    optimizer.zero_grad(set_to_none=True)
    loss = sft_step_loss(model, [batch.examples], batch.pad_id)[0]
    if marks:
        marks.mark("forward_and_loss")
    loss.backward()
    if marks:
        marks.mark("backward")
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if marks:
        marks.mark("clip_and_optimizer")
    return loss.item()


def phase2_step(student, teacher, optimizer, batch: Batch, cfg: DistillConfig, device,
                marks: Marks | None = None, plain: bool = False, sort: bool = True) -> float:
    """The body of one distill() step after generation and scoring: kept samples sorted by length, one
    `sdzero.distill.micro_batch_divergence` and backward per micro-batch, one host copy of the KL sums, clipping
    and the optimiser step.

    `marks` times the parts of the step (the breakdown); it runs `micro_batch_divergence`'s statements one by
    one instead of calling it. `plain=True` (--plain) is the step as it was before the fast path: full
    logits at every position gathered afterwards, a full-vocabulary log-softmax before the top-k, and
    `.item()` / `.tolist()` in every micro-batch. `sort=False` keeps the samples in sampling order."""
    kept = [(layout, r) for layout, r in zip(batch.layouts, batch.rewards) if layout is not None and layout.n_targets]
    if sort and not plain:
        kept.sort(key=lambda item: len(item[0].teacher_ids))
    n_tokens = sum(layout.n_targets for layout, _ in kept)
    student.train()
    if marks:
        marks.start()
    optimizer.zero_grad(set_to_none=True)
    micro_kl, plain_kl = [], []
    for i in range(0, len(kept), cfg.micro_batch_size):
        items = kept[i:i + cfg.micro_batch_size]
        micro = [layout for layout, _ in items]
        if plain:
            s_ids, s_att, t_ids, t_att, s_pos, t_pos, mask = micro_batch_tensors(micro, batch.pad_id, device)
            with torch.no_grad():
                teacher_logits = gather_positions(teacher(input_ids=t_ids, attention_mask=t_att).logits, t_pos)
                logprobs = torch.log_softmax(teacher_logits.float(), dim=-1)
                teacher_logprobs, teacher_indices = logprobs.topk(cfg.top_k, dim=-1) if cfg.top_k else (
                    logprobs, torch.arange(logprobs.size(-1), device=logprobs.device).expand(logprobs.shape))
                del teacher_logits, logprobs
            student_logits = gather_positions(student(input_ids=s_ids, attention_mask=s_att).logits, s_pos)
            per_token = per_token_divergence(student_logits, teacher_logprobs, teacher_indices,
                                             divergence=cfg.divergence, mixed_weight=cfg.mixed_weight,
                                             tail_bucket=cfg.tail_bucket)
            loss = torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / n_tokens
            loss.backward()
            loss.item()
            plain_kl += per_token.detach().masked_fill(~mask, 0).sum(1).tolist()
        elif marks is None:
            per_token, _ = micro_batch_divergence(student, teacher, micro, batch.pad_id, device, cfg)
            (per_token.sum() / n_tokens).backward()
            micro_kl.append(per_token.detach().sum(1))
        else:  # micro_batch_divergence, statement by statement, with a mark after each part
            s_ids, s_att, t_ids, t_att, s_pos, t_pos, mask = micro_batch_tensors(micro, batch.pad_id, device)
            marks.mark("tensors")
            with torch.no_grad():
                teacher_logits = logits_at(teacher, t_ids, t_att, t_pos)
                marks.mark("teacher_forward")
                teacher_logprobs, teacher_indices = teacher_topk(teacher_logits, cfg.top_k)
                del teacher_logits
                marks.mark("teacher_topk")
            student_logits = logits_at(student, s_ids, s_att, s_pos)
            marks.mark("student_forward")
            per_token = per_token_divergence(student_logits, teacher_logprobs, teacher_indices,
                                             divergence=cfg.divergence, mixed_weight=cfg.mixed_weight,
                                             tail_bucket=cfg.tail_bucket)
            per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
            loss = per_token.sum() / n_tokens
            marks.mark("student_loss")
            loss.backward()
            marks.mark("backward")
            micro_kl.append(per_token.detach().sum(1))
    sample_kl = torch.cat(micro_kl).tolist() if micro_kl else plain_kl
    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
    optimizer.step()
    if marks:
        marks.mark("clip_and_optimizer")
    return sum(sample_kl) / n_tokens


def phase2_config(batch: Batch, top_k: int) -> DistillConfig:
    return DistillConfig(micro_batch_size=max(1, len(batch.layouts)), top_k=top_k or None)


# ----------------------------------------------------------------------------------------------------------
# 1. Interleaved step timing


def time_steps(spec: ModelSpec, batch: Batch, args, prefix: str, detail: bool = True) -> None:
    model, _ = build(spec, args.device)
    teacher = Teacher(model)  # a frozen copy, as distill() makes it
    optimizer = make_optimizer(model, args.lr)
    cfg = phase2_config(batch, args.top_k)
    rows = len(batch.layouts)
    widest = {name: max(len(getattr(l, name)) for l in batch.layouts)
              for name in ("teacher_ids", "student_ids", "student_positions")}
    if detail:
        report(f"{prefix}model", spec.describe())
        report(f"{prefix}model_parameters", n_params(model))
        report(f"{prefix}model_weights_mb", sum(p.numel() * p.element_size() for p in model.parameters()) / MB)
        # Full-vocabulary float32 logits the step materialises, against the rows the loss actually reads.
        vocab = model.config.vocab_size
        report(f"{prefix}vocab_size", vocab)
        report(f"{prefix}phase2_teacher_logits_mb", rows * widest["teacher_ids"] * vocab * 4 / MB)
        report(f"{prefix}phase2_student_logits_mb", rows * widest["student_ids"] * vocab * 4 / MB)
        report(f"{prefix}phase2_target_logits_mb", rows * widest["student_positions"] * vocab * 4 / MB)
    # The ~5/3 floor for this batch: SFT = forward + backward = 3 units on the padded student grid; Phase 2
    # adds a teacher forward of (padded teacher grid / padded student grid) units, attention's growth ignored.
    report(f"{prefix}phase2_over_sft_floor", 1 + widest["teacher_ids"] / widest["student_ids"] / 3)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    variants = {
        "sft": lambda: sft_step(model, optimizer, batch),
        "phase2": lambda: phase2_step(model, teacher, optimizer, batch, cfg, args.device),
    }
    if args.plain:
        variants["phase2_plain"] = lambda: phase2_step(model, teacher, optimizer, batch, cfg, args.device,
                                                       plain=True)
    if args.micro_batch and detail:
        small = DistillConfig(micro_batch_size=args.micro_batch, top_k=cfg.top_k)
        variants[f"phase2_micro{args.micro_batch}"] = lambda: phase2_step(model, teacher, optimizer, batch, small,
                                                                         args.device)
        variants[f"phase2_micro{args.micro_batch}_unsorted"] = lambda: phase2_step(
            model, teacher, optimizer, batch, small, args.device, sort=False)
    # Wall time and the process's CPU time (all its threads) of every step. CPU time is what the step
    # computes; on a shared machine it is far less disturbed by other processes than the wall clock.
    times = {name: [] for name in variants}
    cpu_times = {name: [] for name in variants}
    for rep in range(args.warmup + args.reps):
        for name, step in variants.items():
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            sync()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    sft_s, phase2_s = median(times["sft"]), median(times["phase2"])
    report(f"{prefix}sft_step_s", sft_s)
    report(f"{prefix}phase2_step_s", phase2_s)
    report(f"{prefix}phase2_over_sft_step_ratio", phase2_s / sft_s)
    for name in variants:
        report(f"{prefix}{name}_step_cpu_s", median(cpu_times[name]))
    for name in variants:
        if name != "sft":
            report(f"{prefix}{name}_over_sft_step_cpu_ratio", median(cpu_times[name]) / median(cpu_times["sft"]))
    if args.plain:
        plain_s = median(times["phase2_plain"])
        report(f"{prefix}phase2_plain_step_s", plain_s)
        report(f"{prefix}phase2_plain_over_sft_step_ratio", plain_s / sft_s)
    if detail:
        for name, values in times.items():
            report(f"{prefix}{name}_step_s_all", " ".join(f"{t:.3f}" for t in values))
        for name, values in cpu_times.items():
            report(f"{prefix}{name}_step_cpu_s_all", " ".join(f"{t:.3f}" for t in values))
        targets = sum(len(t) for _, t in batch.examples)
        report(f"{prefix}sft_target_tokens_per_s", targets / sft_s)
        report(f"{prefix}phase2_target_tokens_per_s", targets / phase2_s)

    # Where the time goes: extra interleaved rounds with marks (not part of the medians above).
    breakdown = {"sft": [], "phase2": []}
    for _ in range(max(1, min(args.reps, 3))):
        marks = Marks(args.device)
        sft_step(model, optimizer, batch, marks=marks)
        breakdown["sft"].append(marks.times)
        marks = Marks(args.device)
        phase2_step(model, teacher, optimizer, batch, cfg, args.device, marks=marks)
        breakdown["phase2"].append(marks.times)
    parts = {name: {part: median([run[part] for run in runs]) for part in runs[0]}
             for name, runs in breakdown.items()}
    if detail:
        for name, seconds in parts.items():
            for part, value in seconds.items():
                report(f"{prefix}{name}_breakdown_{part}_s", value)
            report(f"{prefix}{name}_breakdown_total_s", median([sum(run.values()) for run in breakdown[name]]))
    p2 = parts["phase2"]
    report(f"{prefix}phase2_teacher_forward_share", p2["teacher_forward"] / sum(p2.values()))
    report(f"{prefix}teacher_over_student_forward_per_token",
           (p2["teacher_forward"] / sum(len(l.teacher_ids) for l in batch.layouts))
           / (p2["student_forward"] / sum(len(l.student_ids) for l in batch.layouts)))
    del model, teacher, optimizer


# ----------------------------------------------------------------------------------------------------------
# 2. Peak memory, one fresh child process per measurement


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs sets the process's peak RSS (VmHWM) back to its current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (C++ libraries write there directly) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class TensorPeak:
    """Peak bytes of live tensors allocated inside the `with` block, from torch's own allocator records.

    On CPU, torch.profiler(profile_memory=True) logs every tensor allocation and free together with the
    running total of the bytes it has seen allocated since profiling began; the peak is the largest running
    total. On CUDA, torch.cuda.max_memory_allocated above the level at entry.
    """

    def __init__(self, device: str):
        self.device, self.peak_mb = device, float("nan")

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with quiet_stderr():  # the profiler's start/stop notices
                self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / MB
            return False
        with quiet_stderr():
            self.prof.__exit__(*exc)
        if exc[0] is None:
            from torch._C._profiler import _EventType

            peak, stack = 0, list(self.prof.profiler.kineto_results.experimental_event_tree())
            while stack:
                event = stack.pop()
                if event.tag == _EventType.Allocation and str(event.extra_fields.device) == "cpu":
                    peak = max(peak, event.extra_fields.total_allocated)
                stack.extend(event.children)
            self.peak_mb = peak / MB
        return False


def _memory_child(spec: ModelSpec, batch: Batch, variant: str, method: str, top_k: int, lr: float,
                  steps: int, threads: int, device: str, queue) -> None:
    """Peak memory of `steps` training steps of one variant, above a baseline that already holds what both
    variants share: imported code, the warmed-up runtime, the student model and its (still empty)
    optimiser. Whatever the steps add counts: gradients, AdamW state, activations, logits, and for Phase 2
    also the frozen teacher copy, made inside the measured window as distill() makes it."""
    try:
        torch.set_num_threads(threads)
        model, _ = build(spec, device)
        optimizer = make_optimizer(model, lr)
        # Warm lazy imports and the runtime before the baseline: the model's forward code paths on a few
        # tokens, and autograd, gradient clipping and AdamW on a throwaway layer (their first call loads code).
        prompt, response = batch.examples[0]
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt[:4] + response[:4]], device=device))
        scratch = torch.nn.Linear(8, 8).to(device)
        scratch_optimizer = make_optimizer(scratch, lr)
        scratch(torch.ones(2, 8, device=device)).sum().backward()
        torch.nn.utils.clip_grad_norm_(scratch.parameters(), 1.0)
        scratch_optimizer.step()
        del scratch, scratch_optimizer

        def run_steps() -> None:
            if variant == "sft":
                for _ in range(steps):
                    sft_step(model, optimizer, batch)
            else:
                teacher = Teacher(model)
                cfg = phase2_config(batch, top_k)
                for _ in range(steps):
                    phase2_step(model, teacher, optimizer, batch, cfg, device,
                                plain=variant == "phase2_plain")

        if method == "tensors":
            with TensorPeak(device) as peak:
                run_steps()
            queue.put((peak.peak_mb, ""))
            return
        base = _status_kb("VmRSS")
        if base is None or not _reset_peak_rss():
            # Without clear_refs the only peak is the lifetime one, which may come from loading: no number.
            queue.put((None, "peak RSS needs Linux /proc/self/clear_refs"))
            return
        run_steps()
        queue.put(((_status_kb("VmHWM") - base) / 1024, ""))
    except BaseException as err:  # report, don't hang the parent
        queue.put((None, f"{type(err).__name__}: {err}"))


def _in_child(*args) -> tuple[float | None, str]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_memory_child, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def peak_memory(spec: ModelSpec, batch: Batch, args, prefix: str) -> None:
    methods = {"tensors": "peak_memory_mb"}
    if args.device == "cpu":
        methods["rss"] = "peak_rss_mb"
    for method, suffix in methods.items():
        results = {}
        for variant in ("sft", "phase2") + (("phase2_plain",) if args.plain else ()):
            value, why = _in_child(spec, batch, variant, method, args.top_k, args.lr, args.memory_steps,
                                   args.threads, args.device)
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
# 3. End-to-end: sdzero.distill.distill vs TRL GRPOTrainer


def run_sdzero(args, seed: int) -> dict:
    """distill() for e2e_steps steps; per-step wall times come from its own metrics.jsonl clock, per-step CPU
    times from the process's CPU clock read whenever distill() writes a step's record."""
    import json

    import sdzero.distill as distill_module
    from sdzero.generation import Generator, SamplingConfig
    from sdzero.training import MetricsLog

    generation_seconds, generation_cpu_seconds, cpu_ends, longest = [], [], [], []

    class TimedGenerator(Generator):  # the transformers backend, timed, in place of distill()'s make_generator
        def sample(self, *a, **k):
            start, cpu_start = time.perf_counter(), time.process_time()
            out = super().sample(*a, **k)
            generation_seconds.append(time.perf_counter() - start)
            generation_cpu_seconds.append(time.process_time() - cpu_start)
            longest.append(max(len(sample.ids) for samples in out for sample in samples))
            return out

    class CpuClockLog(MetricsLog):  # reads the CPU clock at the end of each step, as distill() logs it
        def write(self, record):
            if "loss" in record:
                cpu_ends.append(time.process_time())
            super().write(record)

    model, tokenizer = build(main_spec(args), args.device)
    rows = problems(args, args.e2e_prompts * args.e2e_steps, args.seed)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                              batch_size=args.e2e_prompts)
    cfg = DistillConfig(prompts_per_step=args.e2e_prompts, micro_batch_size=args.e2e_micro_batch,
                        max_steps=args.e2e_steps, lr=args.lr, warmup_steps=0, top_k=args.top_k or None)
    torch.manual_seed(seed)
    originals = distill_module.make_generator, distill_module.MetricsLog
    distill_module.make_generator, distill_module.MetricsLog = TimedGenerator, CpuClockLog
    try:
        with tempfile.TemporaryDirectory() as out:
            cpu_ends.append(time.process_time())
            distill_module.distill(model, tokenizer, rows, reward_function(args), ControlPhrases(), sampling, cfg,
                                   out_dir=out, seed=seed, progress=False)
            records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    finally:
        distill_module.make_generator, distill_module.MetricsLog = originals
    records = [r for r in records if "loss" in r]
    ends = [r["seconds"] for r in records]
    step_s = [b - a for a, b in zip([0.0] + ends, ends)]
    step_cpu_s = [b - a for a, b in zip(cpu_ends, cpu_ends[1:])]
    return {"step_s": step_s[1:], "generation_s": generation_seconds[1:],
            "step_cpu_s": step_cpu_s[1:], "generation_cpu_s": generation_cpu_seconds[1:],
            "response_len": [r["sdzero/response_len"] for r in records[1:]], "longest": longest[1:],
            "samples_per_step": args.e2e_prompts, "prompts_per_step": args.e2e_prompts}


def run_trl_grpo(args, seed: int) -> dict:
    """GRPOTrainer on the same model and prompts: e2e_prompts / G prompts x G rollouts per step."""
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import json

    model, tokenizer = build(main_spec(args), args.device)
    group = args.grpo_generations
    prompts_per_step = args.e2e_prompts // group
    rows = problems(args, prompts_per_step * args.e2e_steps, args.seed)
    # The whole row travels as JSON, so GRPO's reward reads what sdzero's verifier reads.
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": row["problem"]}],
                                  "row": json.dumps(row)} for row in rows])
    verifier = reward_function(args)

    def reward(completions, row, **_):
        return [verifier(c[0]["content"] if isinstance(c, list) else c, json.loads(r))
                for c, r in zip(completions, row)]

    step_ends, cpu_ends, lengths, longest, generation_seconds, generation_cpu_seconds = [], [], [], [], [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            torch.set_num_threads(args.threads)
            step_ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

        def on_step_end(self, *_, **__):
            step_ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])
                longest.append(logs["completions/max_length"])

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
            max_steps=args.e2e_steps, per_device_train_batch_size=args.e2e_micro_batch,
            gradient_accumulation_steps=args.e2e_prompts // args.e2e_micro_batch,  # one generation round per step
            num_generations=group, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            beta=args.grpo_beta, num_iterations=1, use_cpu=args.device == "cpu", bf16=False, fp16=False,
            gradient_checkpointing=args.grpo_gradient_checkpointing, dataloader_num_workers=0, seed=seed,
            log_completions=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Clock()])
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        original = trainer._generate

        def timed_generate(*a, **k):
            start, cpu_start = time.perf_counter(), time.process_time()
            out_ = original(*a, **k)
            generation_seconds.append(time.perf_counter() - start)
            generation_cpu_seconds.append(time.process_time() - cpu_start)
            return out_

        trainer._generate = timed_generate
        torch.set_num_threads(args.threads)
        trainer.train()
    step_s = [b - a for a, b in zip(step_ends, step_ends[1:])]
    step_cpu_s = [b - a for a, b in zip(cpu_ends, cpu_ends[1:])]
    return {"step_s": step_s[1:], "generation_s": generation_seconds[1:],
            "step_cpu_s": step_cpu_s[1:], "generation_cpu_s": generation_cpu_seconds[1:],
            "response_len": lengths[1:], "longest": longest[1:],
            "samples_per_step": prompts_per_step * group, "prompts_per_step": prompts_per_step}


def end_to_end(args) -> None:
    report("e2e_model", main_spec(args).describe())
    report("e2e_samples_per_step", args.e2e_prompts)
    report("e2e_sdzero_layout", f"{args.e2e_prompts} prompts x 1 rollout")
    report("e2e_micro_batch", args.e2e_micro_batch)
    report("e2e_max_new_tokens", args.max_new_tokens)
    report("e2e_temperature", 1.0)
    report("e2e_rounds", f"{args.e2e_rounds} (sdzero, then GRPO, sampling seed {args.seed} + round)")
    report("e2e_steps_timed", f"{args.e2e_steps - 1} per round (step 1 is a warm-up)")
    trl_missing = "--skip-trl" if args.skip_trl else None
    if not trl_missing:
        try:
            import trl

            report("trl_version", trl.__version__)
            reference = f"beta {args.grpo_beta:g}" + (" (no reference model)" if args.grpo_beta == 0 else "")
            checkpointing = ("gradient checkpointing" if args.grpo_gradient_checkpointing
                             else "no gradient checkpointing")
            report("e2e_trl_grpo_layout", f"{args.e2e_prompts // args.grpo_generations} prompts x "
                                          f"{args.grpo_generations} rollouts, {reference}, {checkpointing}, fp32")
        except ImportError as err:
            trl_missing = str(err)
    # Rounds alternate between the trainers, so a change in machine load hits both, and each round samples
    # with another seed, so neither trainer keeps a lucky set of short rollouts.
    sd_rounds, grpo_rounds = [], []
    for r in range(args.e2e_rounds):
        sd_rounds.append(run_sdzero(args, args.seed + r))
        if trl_missing:
            continue
        try:
            grpo_rounds.append(run_trl_grpo(args, args.seed + r))
        except Exception as err:  # the comparison is optional; say why it is missing
            trl_missing = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    sd = _pool(sd_rounds)
    _e2e_report("sdzero", sd)
    if trl_missing:
        report("trl_grpo_samples_per_s", f"unavailable ({trl_missing})")
        report("sdzero_over_trl_grpo_samples_per_s", f"unavailable ({trl_missing})")
        return
    grpo = _pool(grpo_rounds)
    _e2e_report("trl_grpo", grpo)
    sd_rate = sd["samples_per_step"] / median(sd["step_s"])
    grpo_rate = grpo["samples_per_step"] / median(grpo["step_s"])
    report("sdzero_over_trl_grpo_samples_per_s", sd_rate / grpo_rate)
    report("sdzero_over_trl_grpo_samples_per_cpu_s", (sd["samples_per_step"] / median(sd["step_cpu_s"]))
           / (grpo["samples_per_step"] / median(grpo["step_cpu_s"])))
    report("sdzero_over_trl_grpo_prompts_per_s", (sd["prompts_per_step"] / median(sd["step_s"]))
           / (grpo["prompts_per_step"] / median(grpo["step_s"])))


def _pool(results: list[dict]) -> dict:
    """The timed steps of every round, together."""
    return {key: [x for r in results for x in r[key]] if isinstance(results[0][key], list) else results[0][key]
            for key in results[0]}


def _e2e_report(name: str, result: dict) -> None:
    step = median(result["step_s"])
    generation = median(result["generation_s"])
    report(f"{name}_step_s", step)
    report(f"{name}_step_s_all", " ".join(f"{t:.2f}" for t in result["step_s"]))
    report(f"{name}_generation_s", generation)
    report(f"{name}_generation_share", generation / step)
    report(f"{name}_mean_response_tokens", statistics.mean(result["response_len"]))
    # Decoding runs until the longest rollout of the batch ends: the main source of chance in generation time.
    report(f"{name}_longest_response_tokens_all", " ".join(f"{n:.0f}" for n in result["longest"]))
    report(f"{name}_samples_per_s", result["samples_per_step"] / step)
    report(f"{name}_s_per_sample", step / result["samples_per_step"])
    report(f"{name}_train_s_per_sample", (step - generation) / result["samples_per_step"])
    report(f"{name}_prompts_per_s", result["prompts_per_step"] / step)
    step_cpu, generation_cpu = median(result["step_cpu_s"]), median(result["generation_cpu_s"])
    report(f"{name}_step_cpu_s", step_cpu)
    report(f"{name}_step_cpu_s_all", " ".join(f"{t:.2f}" for t in result["step_cpu_s"]))
    report(f"{name}_generation_cpu_s", generation_cpu)
    report(f"{name}_samples_per_cpu_s", result["samples_per_step"] / step_cpu)
    report(f"{name}_train_cpu_s_per_sample", (step_cpu - generation_cpu) / result["samples_per_step"])


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    began = time.perf_counter()
    report("machine_cpu_count", os.cpu_count())
    report("machine_platform", platform.platform())
    report("machine_processor", cpu_name())
    report("python_version", platform.python_version())
    report("torch_version", torch.__version__)
    report("transformers_version", transformers.__version__)
    report("torch_threads", torch.get_num_threads())
    report("omp_wait_policy", os.environ.get("OMP_WAIT_POLICY"))
    report("device", args.device if args.device == "cpu" else torch.cuda.get_device_name())
    report("load_average_1m", f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a")
    report("quick", args.quick)
    report("reps", args.reps)
    report("top_k", args.top_k or "full vocabulary")

    # Same model, same tokens: real rollouts of the model (the shipped lab model, or --model) on training problems.
    small = main_spec(args)
    model, tokenizer = build(small, args.device)
    batch = sampled_batch(model, tokenizer, args, args.batch, args.max_new_tokens, args.seed)
    del model
    batch.describe("")
    time_steps(small, batch, args, "")
    if not args.skip_memory:
        peak_memory(small, batch, args, "")

    if not args.skip_e2e:
        end_to_end(args)

    if not args.skip_long:
        if args.model != "lab":  # the larger random model is a lab-architecture model with the lab tokenizer
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(lab.BASE_MODEL_DIR)
        long_batch = synthetic_batch(tokenizer, args.long_batch, args.long_response_tokens, args.seed)
        longest = max(len(l.teacher_ids) for l in long_batch.layouts)
        spec = ModelSpec("random", hidden=args.long_hidden, layers=args.long_layers, heads=args.long_heads,
                         max_positions=max(2048, longest + 2 * max(args.sweep, default=0)),
                         vocab=args.long_vocab, seed=args.seed)
        long_batch.describe("long_")
        time_steps(spec, long_batch, args, "long_")
        if not args.skip_memory:
            peak_memory(spec, long_batch, args, "long_")
        # The same larger model at other response lengths: how the ratio moves with length alone.
        for tokens in args.sweep:
            sweep_batch = synthetic_batch(tokenizer, args.long_batch, tokens, args.seed)
            report(f"sweep{tokens}_batch_teacher_tokens", sum(len(l.teacher_ids) for l in sweep_batch.layouts))
            time_steps(spec, sweep_batch, args, f"sweep{tokens}_", detail=False)

    report("total_runtime_s", time.perf_counter() - began)


if __name__ == "__main__":
    sys.exit(main())
