"""Baselines compared with SD-Zero under the same questions and sample budget.

    rft    rejection-sampling fine-tuning: G answers per question, SFT on the verified-correct ones
    grpo   TRL's GRPOTrainer with our verifier as its reward and our sampling settings
    sdft   TRL's SDFTTrainer: on-policy self-distillation from a teacher that also sees a demonstration

Each takes a `Budget` that it fills as it samples and trains, and an optional `evaluate_fn(model) ->
accuracy` that it calls along the way for the sample-efficiency curve (see `sdzero.compare`).
"""

from sdzero.baselines.grpo import GRPOBaselineConfig, train_grpo
from sdzero.baselines.rft import RFTConfig, train_rft
from sdzero.baselines.sdft import SDFTBaselineConfig, train_sdft

__all__ = ["GRPOBaselineConfig", "RFTConfig", "SDFTBaselineConfig", "train_grpo", "train_rft", "train_sdft"]
