"""SDFT baseline: on-policy self-distillation whose teacher also sees a demonstration, run with TRL's
experimental SDFTTrainer (it runs as it is on our setting: plain causal LM, CPU or GPU).

The student samples G answers per question from the plain prompt; the teacher (by default the
frozen starting model, TRL's "base") reads the prompt followed by the demonstration, and the
student is pulled towards the teacher's top-k distributions over the student's own tokens. With
data that carry only final answers (ours), the demonstration is the final answer, as in the SD-Zero
paper's ablation; no verifier is used.

Budget: TRL's generation method is wrapped to count every sampled completion; each then goes once
through the student's forward and backward pass (prompt + completion tokens billed as trained).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdzero.baselines.trl_common import (BudgetCallback, TRLBaselineConfig, question_dataset, sdzero_completions,
                                         train_and_measure, trl_arguments)
from sdzero.budget import Budget, LearningCurve
from sdzero.errors import Refusal
from sdzero.generation import SamplingConfig
from sdzero.prompts import generator_prompt_ids
from sdzero.training import MetricsLog


@dataclass
class SDFTBaselineConfig(TRLBaselineConfig):
    """SDFT through TRL's experimental SDFTTrainer."""

    demonstration: str = "The correct final answer is {answer}."
    """The teacher's privileged context, formatted with the question's fields (here: only the answer)."""
    teacher: str = "base"
    """TRL teacher_model_kind: "base" (frozen starting model), "ema" or "live"."""
    teacher_update_rate: float = 0.05
    """EMA rate when teacher is "ema"."""
    top_k: int = 100
    """Teacher top-k support of the distillation loss (TRL's default)."""
    alpha: float = 0.5
    """TRL distillation_alpha: interpolation between forward and reverse KL (TRL's default 0.5)."""


def train_sdft(model, tokenizer, questions: list[dict], sampling: SamplingConfig, cfg: SDFTBaselineConfig,
               budget: Budget, *, out_dir: str | Path, seed: int = 0, evaluate_fn=None,
               system_prompt: str | None = None, progress: bool = True) -> dict:
    """Train `model` in place with TRL's SDFTTrainer; returns a summary with the learning curve."""
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    if not questions:
        raise Refusal("SDFT needs at least one question; the question set is empty")
    out_dir = Path(out_dir)
    # TRL passes only prompt token ids down to generation; map them back to the questions they ask.
    question_of_prompt = {tuple(generator_prompt_ids(tokenizer, q["problem"], system_prompt)): q["id"]
                          for q in questions}

    class CountingSDFTTrainer(SDFTTrainer):
        def _generate(self, prompt_ids):
            result = super()._generate(prompt_ids)
            completion_ids = result[1]
            budget.sampled([question_of_prompt.get(tuple(p)) for p in prompt_ids],
                           [len(ids) for ids in completion_ids])
            budget.trained(sum(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)))
            return result

        def _generate_transformers(self, prompt_ids):
            completions = sdzero_completions(self, prompt_ids, sampling)
            return super()._generate_transformers(prompt_ids) if completions is None else (prompt_ids, completions)

    def demonstration(q: dict) -> str:
        try:
            return cfg.demonstration.format(**q)
        except KeyError as err:
            raise Refusal(f"sdft.demonstration names the field {err} that question {q.get('id')!r} lacks") from None

    args = trl_arguments(SDFTConfig, cfg, out_dir=out_dir, sampling=sampling, seed=seed, progress=progress,
                         teacher_model_kind=cfg.teacher, teacher_update_rate=cfg.teacher_update_rate,
                         distillation_topk=cfg.top_k, distillation_alpha=cfg.alpha,
                         max_prompt_length=None)
    curve = LearningCurve(budget, evaluate_fn)
    callback = BudgetCallback("sdft", budget, curve, MetricsLog(out_dir / "metrics.jsonl"), cfg.eval_every)
    dataset = question_dataset(questions, system_prompt, privileged_context=demonstration)
    trainer = CountingSDFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                  callbacks=[callback])
    steps = train_and_measure(trainer, model, curve, progress)
    return {"steps": steps, "curve": curve.points,
            "settings": {"teacher": cfg.teacher, "top_k": cfg.top_k, "alpha": cfg.alpha,
                         "num_generations": cfg.num_generations, "lr": cfg.lr,
                         "demonstration": cfg.demonstration}}
