"""GRPO baseline: TRL's GRPOTrainer (the implementation users would otherwise pick), one epoch over the
questions, G rollouts per prompt, our verifier's binary verdict as the reward (None, where no reward function
gave a value, so that TRL leaves the completion out of the advantage as well), our sampling settings.

The reward function is also where the budget is counted: TRL hands it every sampled completion with
its token ids, exactly once. Each completion then goes through one forward and backward pass
(`num_iterations` = 1), so its prompt + completion tokens are billed as trained tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdzero.baselines.trl_common import (BudgetCallback, TRLBaselineConfig, question_dataset, sdzero_completions,
                                         train_and_measure, trl_arguments)
from sdzero.budget import Budget, LearningCurve
from sdzero.errors import Refusal
from sdzero.generation import Sample, SamplingConfig
from sdzero.prompts import end_of_turn_ids, generator_prompt_ids
from sdzero.rewards import Verifier
from sdzero.training import MetricsLog


@dataclass
class GRPOBaselineConfig(TRLBaselineConfig):
    """GRPO through TRL (DAPO-style loss, binary reward, one epoch)."""

    beta: float = 0.0
    """KL coefficient to the starting model (TRL's default 0: no reference model)."""
    loss_type: str = "dapo"
    """TRL loss aggregation; "dapo" (TRL's default) normalises over all tokens of the batch."""
    epsilon: float = 0.2
    """Lower clipping range of the importance ratio."""
    epsilon_high: float = 0.28
    """Upper clipping range (DAPO's clip-higher: 0.28)."""
    scale_rewards: str = "group"
    """Advantage scaling: "group" (GRPO), "batch" or "none" (Dr. GRPO)."""


def train_grpo(model, tokenizer, questions: list[dict], verifier: Verifier, sampling: SamplingConfig,
               cfg: GRPOBaselineConfig, budget: Budget, *, out_dir: str | Path, seed: int = 0, evaluate_fn=None,
               system_prompt: str | None = None, progress: bool = True) -> dict:
    """Train `model` in place with TRL's GRPOTrainer; returns a summary with the learning curve."""
    from trl import GRPOConfig, GRPOTrainer

    if not questions:
        raise Refusal("GRPO needs at least one question; the question set is empty")
    out_dir = Path(out_dir)
    prompt_lengths = [len(generator_prompt_ids(tokenizer, q["problem"], system_prompt)) for q in questions]

    verifier = Verifier.of(verifier)
    eot = end_of_turn_ids(tokenizer)

    def verifier_reward(prompts, completions, completion_ids, question_index, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        budget.sampled([questions[i]["id"] for i in question_index], [len(ids) for ids in completion_ids])
        budget.trained(sum(prompt_lengths[i] + len(ids) for i, ids in zip(question_index, completion_ids)))
        # Judged exactly as SD-Zero's rollouts are: a completion is finished when it ends in a stop token.
        samples = [Sample(list(ids), text, bool(ids) and ids[-1] in eot) for ids, text in zip(completion_ids, texts)]
        return verifier.score(samples, [questions[i] for i in question_index], sampling)

    verifier_reward.__name__ = "verifier"
    args = trl_arguments(GRPOConfig, cfg, out_dir=out_dir, sampling=sampling, seed=seed, progress=progress,
                         beta=cfg.beta, loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                         scale_rewards=cfg.scale_rewards, num_iterations=1)
    curve = LearningCurve(budget, evaluate_fn)
    callback = BudgetCallback("grpo", budget, curve, MetricsLog(out_dir / "metrics.jsonl"), cfg.eval_every)
    class SampledGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            completions = None if images or multimodal_fields else sdzero_completions(self, prompt_ids, sampling)
            if completions is None:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            return completions, None  # no sampling log-probs, as TRL's own transformers path

    trainer = SampledGRPOTrainer(model=model, reward_funcs=verifier_reward, args=args,
                          train_dataset=question_dataset(questions, system_prompt), processing_class=tokenizer,
                          callbacks=[callback])
    steps = train_and_measure(trainer, model, curve, progress)
    return {"steps": steps, "curve": curve.points,
            "settings": {"trl_loss_type": cfg.loss_type, "beta": cfg.beta, "epsilon": cfg.epsilon,
                         "epsilon_high": cfg.epsilon_high, "scale_rewards": cfg.scale_rewards,
                         "num_generations": cfg.num_generations, "lr": cfg.lr}}
