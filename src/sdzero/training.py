"""Small pieces shared by every training loop: padding, SFT steps, optimiser and schedule, logging."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from sdzero.losses import sft_loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def pad_right(rows: list[list[int]], pad_value: int) -> torch.Tensor:
    width = max(map(len, rows))
    # one tensor built from padded lists: a per-row torch.tensor costs more than the padding itself
    return torch.tensor([list(row) + [pad_value] * (width - len(row)) for row in rows], dtype=torch.long)


def gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """values [B, L, D] at positions [B, T] -> [B, T, D]."""
    return values.gather(1, positions.unsqueeze(-1).expand(-1, -1, values.size(-1)))


def unwrap(model):
    """The model inside DDP / FSDP style wrappers (they keep it in `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def logits_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Next-token logits at `positions` [B, T] only: [B, T, V], as `gather_positions(model(...).logits, positions)`.

    The vocabulary projection is the widest matmul of a forward pass and its output the largest tensor;
    the loss reads only a few of its rows. A pre-hook on the LM head gathers the hidden states at
    `positions` before the projection, so the model's own forward runs otherwise unchanged (peft and DDP
    wrappers, logit post-processing such as soft-capping). Where the head is not called as a module on
    [B, L, H] hidden states, the full logits are computed and gathered instead.
    """
    head = unwrap(model).get_output_embeddings()
    hooked = []

    def gather_hidden(_module, args):
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != input_ids.shape:
            return None
        hooked.append(True)
        return (gather_positions(hidden, positions), *args[1:])

    handle = head.register_forward_pre_hook(gather_hidden) if head is not None else None
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits if hooked else gather_positions(logits, positions)


def sft_batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """(context, target) pairs -> input ids, attention mask, and labels already shifted by one.

    Only target tokens carry a label, so the loss is NLL(target | context).
    """
    input_ids = pad_right([c + t for c, t in examples], pad_id)
    attention_mask = pad_right([[1] * (len(c) + len(t)) for c, t in examples], 0)
    labels = pad_right([[-100] * len(c) + t for c, t in examples], -100)
    return input_ids, attention_mask, labels[:, 1:]


def sft_step_loss(model, examples: list[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Mean NLL of the targets given their contexts (one forward pass)."""
    device = model_device(model)
    input_ids, attention_mask, labels = sft_batch(examples, pad_id)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    return sft_loss(logits[:, :-1], labels.to(device))


def make_optimizer(model, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_schedule(optimizer, *, warmup_steps: int, total_steps: int, kind: str = "cosine"):
    """Linear warm-up, then cosine decay to zero or a constant rate."""
    if kind not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {kind!r}; choose 'cosine' or 'constant'")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl; stops the run on a NaN or inf loss."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        loss = record.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at {record.get('stage', 'training')} step {record.get('step')}; "
                                     "try a lower learning rate")
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return rows
