"""The counters of one Phase 2 step and the figures metrics.jsonl gives for it."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class StepStats:
    """One optimiser step's counters, summed over its micro-batches and then over the processes.

    While a step adds to it, a counter may hold a 0-d float32 tensor on the step's device (no host copy per
    micro-batch); `summed` stacks the counters into one tensor, reduces it in one call, and gives plain floats."""

    rollouts: float = 0.0
    reward: float = 0.0
    """Sum of the rewards."""
    no_reward: float = 0.0
    """Answers no reward function could judge (left out of the step)."""
    unfinished: float = 0.0
    """Answers cut by the token cap."""
    length: float = 0.0
    """Sampled tokens."""
    truncated: float = 0.0
    """Samples whose second copy of y was cut to fit the teacher's context."""
    masked: float = 0.0
    """Samples left out because the teacher's context could not hold them."""
    trained: float = 0.0
    """Student input tokens trained on."""
    tokens: float = 0.0
    """Target tokens: the loss is their mean."""
    kl_wrong: float = 0.0
    """Divergence summed over the targets of wrong answers (`tokens_wrong` of them); `kl_right` likewise."""
    tokens_wrong: float = 0.0
    kl_right: float = 0.0
    tokens_right: float = 0.0
    entropy: float = 0.0
    """The student's entropy, summed over the targets."""
    topk_mass: float = 0.0
    """The student's probability on the teacher's top-k, summed over the targets."""
    gold_hits: float = 0.0
    """Targets whose known right token (distill's `diagnostics`) is the teacher's most likely one, of `gold_tokens`."""
    gold_tokens: float = 0.0
    grad_norm: float = 0.0
    """Gradient norm before clipping: the same on every process, so not summed."""

    def add_micro_batch(self, per_token: torch.Tensor, token_stats: dict, layouts: list, rewards: list[float],
                        gold: list[list[tuple[int, int]]]) -> None:
        """One micro-batch's per-token divergence [B, T] and diagnostics (`distill.micro_batch_divergence`)."""
        mask = token_stats["mask"]
        per_sample = per_token.sum(1)
        wrong = torch.tensor([r < 1.0 for r in rewards], device=per_token.device)
        lengths = mask.sum(1).float()
        self.tokens += lengths.sum()
        self.kl_wrong += per_sample[wrong].sum()
        self.tokens_wrong += lengths[wrong].sum()
        self.kl_right += per_sample[~wrong].sum()
        self.tokens_right += lengths[~wrong].sum()
        self.entropy += token_stats["entropy"][mask].sum()
        self.topk_mass += token_stats["topk_mass"][mask].sum()
        in_targets = [[(t, token) for t, token in known if t < layout.n_targets]
                      for known, layout in zip(gold, layouts)]
        if any(in_targets):
            teacher_top = token_stats["teacher_top"].tolist()  # a host copy only where there is something to check
            self.gold_hits += sum(teacher_top[row][t] == token for row, known in enumerate(in_targets)
                                  for t, token in known)
            self.gold_tokens += sum(map(len, in_targets))

    def count_rollouts(self, rollouts, trained: list[int]) -> None:
        """The step's rollouts (`distill.Rollouts`); `trained`: the indices of those trained on."""
        self.reward = sum(r for r in rollouts.rewards if r is not None)
        self.no_reward = sum(r is None for r in rollouts.rewards)
        self.rollouts = len(rollouts.samples)
        self.unfinished = sum(not y.finished for y in rollouts.samples)
        self.length = sum(len(y.ids) for y in rollouts.samples)
        self.truncated = sum(1 for layout in rollouts.layouts if layout is not None and layout.truncated)
        self.masked = sum(1 for layout in rollouts.layouts if layout is None) - self.no_reward
        self.trained = sum(len(rollouts.layouts[i].student_ids) for i in trained)

    def summed(self, accelerator) -> StepStats:
        """The counters summed over the processes (one all-reduce), as plain floats."""
        names = [f.name for f in fields(self) if f.name != "grad_norm"]
        counters = torch.stack([torch.as_tensor(getattr(self, name), dtype=torch.float32, device=accelerator.device)
                                for name in names])
        return StepStats(**dict(zip(names, accelerator.reduce(counters).tolist())), grad_norm=self.grad_norm)

    def metrics(self) -> dict:
        """metrics.jsonl's per-step figures."""
        tokens = max(1.0, self.tokens)
        kl = (self.kl_wrong + self.kl_right) / tokens
        metrics = {
            "loss": kl, "sdzero/kl": kl,
            "sdzero/reward": self.reward / max(1.0, self.rollouts - self.no_reward),
            "sdzero/no_reward": int(self.no_reward),
            "sdzero/kl_wrong": self.kl_wrong / max(1.0, self.tokens_wrong),
            "sdzero/kl_right": self.kl_right / max(1.0, self.tokens_right),
            "sdzero/response_len": self.length / self.rollouts,
            "sdzero/unfinished": self.unfinished / self.rollouts,
            "sdzero/truncated": int(self.truncated),
            "sdzero/masked_out": int(self.masked),
            "sdzero/entropy": self.entropy / tokens,
            # the renormalised top-k loss cannot see the student's mass outside the teacher's top-k
            "sdzero/student_topk_mass": self.topk_mass / tokens,
        }
        if self.gold_tokens:
            metrics["sdzero/teacher_gold_agreement"] = self.gold_hits / self.gold_tokens
        return {**metrics, "sdzero/grad_norm": self.grad_norm}
