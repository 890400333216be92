"""End-to-end Phase 2 samples per second, generation included: sdzero's trainer against TRL's GRPOTrainer.

sdzero runs its own `sdzero.distill.distill`, given a sampler of its own transformers backend with clocks on it
(`distill`'s public `generator` argument); GRPO runs TRL's `GRPOTrainer`. Both start from the same model, get the
same prompts, the same number of generated samples per step and the same micro-batch size, and run in rounds that
alternate between the two (sdzero, GRPO, sdzero, GRPO, ...), round r sampling with seed --seed + r for both.
Figures are medians over the timed steps of all rounds, each printed as a `name: value` line
(benchmarks/README.md explains them). `--quick` is a smoke run; `--help` lists every option.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (apply_sizes, begin, build, median, model_spec, problems, report, reward_function,
                    sized_parser)  # first: it sets the environment torch reads when it loads
import torch

from sdzero.distill import DistillConfig, distill
from sdzero.generation import Generator, SamplingConfig
from sdzero.prompts import ControlPhrases
from sdzero.training import read_jsonl

FULL = dict(max_new_tokens=160, e2e_steps=3, e2e_rounds=3, e2e_prompts=32, e2e_micro_batch=8, grpo_generations=2)
QUICK = dict(max_new_tokens=48, e2e_steps=2, e2e_rounds=1, e2e_prompts=8, e2e_micro_batch=4, grpo_generations=2)
SIZES = {
    "max_new_tokens": "longest sampled response, for both trainers",
    "e2e_steps": "optimiser steps of each trainer per round; the first one is a warm-up and is not counted, so at "
                 "least 2",
    "e2e_rounds": "rounds of both trainers, alternating, each with its own sampling seed",
    "e2e_prompts": "sdzero prompts per step (one rollout each) = generated samples per step for both trainers",
    "e2e_micro_batch": "samples per forward/backward pass in both trainers (sdzero micro_batch_size, TRL "
                       "per_device_train_batch_size with gradient accumulation over the step's samples); "
                       "--e2e-prompts gives one pass per step",
    "grpo_generations": "GRPO rollouts per prompt; GRPO gets e2e-prompts / grpo-generations prompts per step",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = sized_parser(__doc__, FULL, QUICK, SIZES)
    p.add_argument("--grpo-beta", type=float, default=0.0,
                   help="GRPO KL coefficient; > 0 adds TRL's reference-model forward (default: %(default)s, "
                        "TRL's default)")
    p.add_argument("--grpo-gradient-checkpointing", action="store_true",
                   help="GRPO with gradient checkpointing (TRL's default; off here by default because sdzero "
                        "trains without it)")
    p.add_argument("--skip-trl", action="store_true", help="skip the TRL GRPOTrainer run (sdzero's still runs)")
    args = p.parse_args(argv)
    apply_sizes(args, FULL, QUICK)
    if args.e2e_steps < 2:
        p.error("--e2e-steps must be at least 2 (the first step is a warm-up)")
    if args.grpo_generations < 2 or args.e2e_prompts % args.grpo_generations:
        p.error("--grpo-generations must be >= 2 and divide --e2e-prompts")
    if args.e2e_micro_batch < 1 or args.e2e_prompts % args.e2e_micro_batch:
        p.error("--e2e-micro-batch must be >= 1 and divide --e2e-prompts")
    return args


def gaps(clocks: list[float]) -> list[float]:
    return [b - a for a, b in zip(clocks, clocks[1:])]


class TimedGenerator(Generator):
    """sdzero's transformers sampler with clocks: the wall and CPU time of each sampling call and its longest
    answer, and the clocks at each `refresh`, which distill() calls before its first step and after every optimiser
    step that trained on a token, so the gaps between them are whole steps, sampling included."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_s, self.generation_cpu_s, self.longest, self.ends, self.cpu_ends = [], [], [], [], []

    def sample(self, *args, **kwargs):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = super().sample(*args, **kwargs)
        self.generation_s.append(time.perf_counter() - start)
        self.generation_cpu_s.append(time.process_time() - cpu_start)
        self.longest.append(max(len(sample.ids) for samples in out for sample in samples))
        return out

    def refresh(self, model) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        super().refresh(model)


def run_sdzero(args, seed: int) -> dict:
    """distill() for e2e_steps steps; the timed steps are all but the first."""
    model, tokenizer = build(model_spec(args))
    rows = problems(args, args.e2e_prompts * args.e2e_steps, args.seed)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                              batch_size=args.e2e_prompts, backend="transformers")
    cfg = DistillConfig(prompts_per_step=args.e2e_prompts, micro_batch_size=args.e2e_micro_batch,
                        max_steps=args.e2e_steps, lr=args.lr, warmup_steps=0, top_k=args.top_k or None)
    generator = TimedGenerator(model, tokenizer, sampling)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as out:
        distill(model, tokenizer, rows, reward_function(args), ControlPhrases(), sampling, cfg, out_dir=out,
                seed=seed, progress=False, generator=generator)
        records = [r for r in read_jsonl(Path(out) / "metrics.jsonl") if "loss" in r]
    if len(generator.ends) != args.e2e_steps + 1:
        raise RuntimeError("a Phase 2 step trained on no token, so its end was not seen; try other --seed")
    return {"step_s": gaps(generator.ends)[1:], "generation_s": generator.generation_s[1:],
            "step_cpu_s": gaps(generator.cpu_ends)[1:], "generation_cpu_s": generator.generation_cpu_s[1:],
            "response_len": [r["sdzero/response_len"] for r in records[1:]], "longest": generator.longest[1:],
            "samples_per_step": args.e2e_prompts, "prompts_per_step": args.e2e_prompts}


def run_trl_grpo(args, seed: int) -> dict:
    """GRPOTrainer on the same model and prompts: e2e_prompts / G prompts x G rollouts per step."""
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = build(model_spec(args))
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

    ends, cpu_ends, lengths, longest, generation_s, generation_cpu_s = [], [], [], [], [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            torch.set_num_threads(args.threads)
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())
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
            beta=args.grpo_beta, num_iterations=1, use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
            gradient_checkpointing=args.grpo_gradient_checkpointing, dataloader_num_workers=0, seed=seed,
            log_completions=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Clock()])
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        generate = trainer._generate  # TRL has no public hook around its sampling: time the trainer's own call

        def timed_generate(*a, **k):
            start, cpu_start = time.perf_counter(), time.process_time()
            result = generate(*a, **k)
            generation_s.append(time.perf_counter() - start)
            generation_cpu_s.append(time.process_time() - cpu_start)
            return result

        trainer._generate = timed_generate
        torch.set_num_threads(args.threads)
        trainer.train()
    return {"step_s": gaps(ends)[1:], "generation_s": generation_s[1:],
            "step_cpu_s": gaps(cpu_ends)[1:], "generation_cpu_s": generation_cpu_s[1:],
            "response_len": lengths[1:], "longest": longest[1:],
            "samples_per_step": prompts_per_step * group, "prompts_per_step": prompts_per_step}


def pooled(results: list[dict]) -> dict:
    """The timed steps of every round, together."""
    return {key: [x for r in results for x in r[key]] if isinstance(results[0][key], list) else results[0][key]
            for key in results[0]}


def report_trainer(name: str, result: dict) -> None:
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


def report_settings(args) -> str | None:
    """The comparison's settings; returns why TRL is left out, or None."""
    report("e2e_model", model_spec(args).describe())
    report("e2e_samples_per_step", args.e2e_prompts)
    report("e2e_sdzero_layout", f"{args.e2e_prompts} prompts x 1 rollout")
    report("e2e_micro_batch", args.e2e_micro_batch)
    report("e2e_max_new_tokens", args.max_new_tokens)
    report("e2e_temperature", 1.0)
    report("e2e_rounds", f"{args.e2e_rounds} (sdzero, then GRPO, sampling seed {args.seed} + round)")
    report("e2e_steps_timed", f"{args.e2e_steps - 1} per round (step 1 is a warm-up)")
    if args.skip_trl:
        return "--skip-trl"
    try:
        import trl
    except ImportError as err:
        return str(err)
    report("trl_version", trl.__version__)
    reference = f"beta {args.grpo_beta:g}" + (" (no reference model)" if args.grpo_beta == 0 else "")
    checkpointing = "gradient checkpointing" if args.grpo_gradient_checkpointing else "no gradient checkpointing"
    report("e2e_trl_grpo_layout", f"{args.e2e_prompts // args.grpo_generations} prompts x "
                                  f"{args.grpo_generations} rollouts, {reference}, {checkpointing}, fp32")
    return None


def main(argv=None) -> None:
    args = parse_args(argv)
    began = begin(args)
    trl_missing = report_settings(args)
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
    sd = pooled(sd_rounds)
    report_trainer("sdzero", sd)
    if trl_missing:
        report("trl_grpo_samples_per_s", f"unavailable ({trl_missing})")
        report("sdzero_over_trl_grpo_samples_per_s", f"unavailable ({trl_missing})")
    else:
        grpo = pooled(grpo_rounds)
        report_trainer("trl_grpo", grpo)
        for unit, key in (("s", "step_s"), ("cpu_s", "step_cpu_s")):
            report(f"sdzero_over_trl_grpo_samples_per_{unit}", (sd["samples_per_step"] / median(sd[key]))
                   / (grpo["samples_per_step"] / median(grpo[key])))
        report("sdzero_over_trl_grpo_prompts_per_s", (sd["prompts_per_step"] / median(sd["step_s"]))
               / (grpo["prompts_per_step"] / median(grpo["step_s"])))
    report("total_runtime_s", time.perf_counter() - began)


if __name__ == "__main__":
    sys.exit(main())
