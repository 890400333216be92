"""What the TRL-based baselines share: our questions as a TRL dataset, TRL arguments carrying our
sampling settings, sampling with our `Generator`, a callback that logs the budget and measures the
learning curve, and the training pass with the curve's last point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback

from sdzero.budget import Budget, LearningCurve
from sdzero.errors import Refusal
from sdzero.generation import Generator, SamplingConfig
from sdzero.prompts import chat_messages
from sdzero.training import MetricsLog


def question_dataset(questions: list[dict], system_prompt: str | None, **columns) -> Dataset:
    """One row per question: its prompt, its index into `questions` (so any field reaches the verifier),
    and extra columns given as functions of the question."""
    return Dataset.from_list([
        # TRL applies the chat template to these messages, as `generator_prompt_ids` does
        {"prompt": chat_messages(q["problem"], system_prompt), "question_index": i,
         **{name: fn(q) for name, fn in columns.items()}}
        for i, q in enumerate(questions)])


def sdzero_completions(trainer, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[list[int]] | None:
    """Completions of `prompt_ids` (one each) drawn by our `Generator` from the trainer's model, as SD-Zero
    and RFT draw theirs, so a comparison's wall times compare methods, not decoding loops (TRL's own
    `generate` keeps decoding every row until the batch's last one ends). None where TRL must sample
    itself: with vLLM, or over several processes, where its `generate` keeps them in step."""
    if trainer.use_vllm or trainer.accelerator.num_processes > 1:
        return None
    generator = Generator(trainer.model, trainer.processing_class, sampling)
    return [per_prompt[0].ids for per_prompt in generator.sample(prompt_ids, 1, progress=False)]


@dataclass
class TRLBaselineConfig:
    """What the TRL baselines (GRPO, SDFT) share: G on-policy completions per question, one pass."""

    num_generations: int = 4
    """On-policy completions G per question (paper: 4)."""
    prompts_per_step: int = 32
    """Questions per optimiser step; the step trains on prompts_per_step x G completions."""
    micro_batch_size: int = 32
    """Completions per forward/backward pass (TRL's per_device_train_batch_size)."""
    lr: float = 1e-6
    """Learning rate after warm-up (constant)."""
    warmup_steps: int = 0
    """Optimiser steps of linear warm-up."""
    eval_every: int | None = None
    """Measure the learning curve every N optimiser steps."""


def trl_arguments(config_class, cfg: TRLBaselineConfig, *, out_dir: Path, sampling: SamplingConfig, seed: int,
                  progress: bool, **extra):
    """TRL config for one pass over the questions: `prompts_per_step` x G completions per optimiser step,
    our temperature / top_p / max_new_tokens, plain fp32 without gradient checkpointing, no checkpoints."""
    completions_per_step = cfg.prompts_per_step * cfg.num_generations
    if completions_per_step % cfg.micro_batch_size:
        raise Refusal(f"prompts_per_step x num_generations ({completions_per_step}) must be a multiple of "
                         f"micro_batch_size ({cfg.micro_batch_size})")
    return config_class(
        output_dir=str(out_dir / "trl"), num_train_epochs=1, seed=seed, data_seed=seed,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=completions_per_step // cfg.micro_batch_size,
        num_generations=cfg.num_generations, max_completion_length=sampling.max_new_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
        learning_rate=cfg.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=cfg.warmup_steps,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=not progress,
        gradient_checkpointing=False, bf16=False, fp16=False, **extra)


class BudgetCallback(TrainerCallback):
    """Writes each TRL log line with the budget counters to metrics.jsonl; measures the curve every N steps."""

    def __init__(self, stage: str, budget: Budget, curve: LearningCurve, log: MetricsLog | None,
                 eval_every: int | None):
        self.stage, self.budget, self.curve, self.log, self.eval_every = stage, budget, curve, log, eval_every

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.log and logs and "loss" in logs:
            self.log.write({"stage": self.stage, "step": state.global_step, **logs, **self.budget.record()})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.eval_every and state.global_step % self.eval_every == 0:
            self.curve.point(model, step=state.global_step)


def train_and_measure(trainer, model, curve: LearningCurve, progress: bool) -> int:
    """Run the trainer's pass, then measure the learning curve on the trained model; returns the optimiser steps."""
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log line when the progress bar is off
    trainer.train()
    model.eval()
    curve.point(model, step=trainer.state.global_step)
    return trainer.state.global_step
