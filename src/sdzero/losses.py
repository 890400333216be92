"""Losses for SD-Zero: supervised fine-tuning and token-level self-distillation.

Conventions: logits are ``[B, T, V]``; ``logits[:, t]`` predicts ``labels[:, t]``
(callers shift labels beforehand). All reductions run in float32.

Self-distillation compares, at every aligned response position, the student's
next-token distribution ``p_S`` with a frozen teacher's ``p_T`` on a support
``K`` = the teacher's top-k tokens (the whole vocabulary when ``top_k`` is None):

* renormalised (default): ``p(i) = p_full(i) / sum_{j in K} p_full(j)`` for ``i in K``;
* tail bucket: keep ``p_full(i)`` for ``i in K`` and add one bucket holding
  ``1 - sum_{j in K} p_full(j)``, so mass outside ``K`` is still compared.

Divergences, summed over the support (terms with weight ``p = 0`` count as 0):

* forward: ``KL(p_T || p_S) = sum p_T (log p_T - log p_S)``
* reverse: ``KL(p_S || p_T) = sum p_S (log p_S - log p_T)``
* mixed:   ``w * forward + (1 - w) * reverse``

The loss is the mean of the per-position divergence over masked-in positions.
The teacher never receives gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sdzero.errors import Refusal

DIVERGENCES = ("forward", "reverse", "mixed")

# Upper bound on log(sum of top-k probs): keeps log(1 - sum) finite when the
# top-k already holds (numerically) all of the mass.
_MAX_TOPK_LOGMASS = -1e-7


def _check_options(divergence: str, mixed_weight: float) -> None:
    if divergence not in DIVERGENCES:
        raise Refusal(f"unknown divergence {divergence!r}; expected one of: {', '.join(DIVERGENCES)}")
    if not 0.0 <= mixed_weight <= 1.0:
        raise Refusal(f"mixed_weight must be in [0, 1], got {mixed_weight}")


def _check_shape(name: str, shape: torch.Size, expected_name: str, expected: torch.Size) -> None:
    if shape != expected:
        raise ValueError(  # a caller's bug, not bad input: it keeps its traceback
            f"shape mismatch: {name} has shape {tuple(shape)} but {expected_name} has shape {tuple(expected)}"
        )


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean causal-LM negative log-likelihood over tokens whose label is not ``ignore_index``.

    ``logits[:, t]`` predicts ``labels[:, t]``: no shift happens here. Returns a zero
    that is still attached to ``logits``' graph when every label is ignored.
    """
    _check_shape("labels", labels.shape, "logits[..., 0]", logits.shape[:-1])
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    # clamp instead of branching: an all-ignored batch gives 0 / 1 with no host sync
    count = (labels != ignore_index).sum().clamp(min=1)
    return total / count


@torch.no_grad()
def teacher_topk(teacher_logits: Tensor, top_k: int | None) -> tuple[Tensor, Tensor]:
    """Full-vocabulary teacher log-probs at its ``top_k`` most likely tokens.

    Returns ``(logprobs, indices)``, each ``[..., k]``, float32 values sorted in
    descending order. ``top_k=None`` or ``top_k >= V`` keeps the whole vocabulary
    (indices are ``0..V-1``). Nothing returned carries gradient, so callers may
    free the full teacher logits afterwards.
    """
    if top_k is not None and top_k < 1:
        raise Refusal(f"top_k must be >= 1 or None, got {top_k}")
    logits = teacher_logits.detach().float()
    vocab = logits.size(-1)
    if top_k is None or top_k >= vocab:
        # order does not matter for the divergence, so skip the full-vocabulary sort
        logprobs = torch.log_softmax(logits, dim=-1)
        indices = torch.arange(vocab, device=logprobs.device).expand(logprobs.shape)
        return logprobs, indices
    # log_softmax is monotonic: take the top-k of the logits and normalise only those k values, instead of
    # building a second full-vocabulary tensor of log-probs
    values, indices = logits.topk(top_k, dim=-1)
    return values - logits.logsumexp(dim=-1, keepdim=True), indices


def _append_tail(logp: Tensor) -> Tensor:
    """Append ``log(1 - sum(exp(logp)))`` as one extra bucket along the last dim."""
    log_mass = logp.logsumexp(dim=-1, keepdim=True).clamp(max=_MAX_TOPK_LOGMASS)
    # log(-expm1(x)) = log(1 - e^x), accurate when the kept mass is close to 1
    return torch.cat([logp, torch.log(-torch.expm1(log_mass))], dim=-1)


def _renormalise(logp: Tensor) -> Tensor:
    return logp - logp.logsumexp(dim=-1, keepdim=True)


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """``sum p (log p - log q)`` over the last dim, with ``0 * anything = 0``."""
    p = logp.exp()
    # masking the difference (not the product) also keeps the backward pass free of 0 * inf
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(dim=-1)


def per_token_divergence(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_indices: Tensor,
    *,
    divergence: str = "reverse",
    mixed_weight: float = 0.5,
    tail_bucket: bool = False,
) -> Tensor:
    """Divergence between student and teacher at every position, shape ``[B, T]``.

    ``teacher_indices`` ``[B, T, k]`` is the support and ``teacher_logprobs``
    ``[B, T, k]`` the teacher's full-vocabulary log-probs there (see
    :func:`teacher_topk`). Without ``tail_bucket`` both sides are renormalised
    over the support; with it, each side gets one extra bucket for its mass
    outside the support (skipped when the support is the whole vocabulary).
    """
    _check_options(divergence, mixed_weight)
    _check_shape("teacher_logprobs", teacher_logprobs.shape, "teacher_indices", teacher_indices.shape)
    _check_shape(
        "teacher_indices[..., 0]", teacher_indices.shape[:-1], "student_logits[..., 0]", student_logits.shape[:-1]
    )

    log_t = teacher_logprobs.detach().float()
    log_s = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_indices)

    if tail_bucket and teacher_indices.size(-1) < student_logits.size(-1):
        log_t, log_s = _append_tail(log_t), _append_tail(log_s)
    else:
        log_t, log_s = _renormalise(log_t), _renormalise(log_s)

    if divergence == "forward":
        return _kl(log_t, log_s)
    if divergence == "reverse":
        return _kl(log_s, log_t)
    return mixed_weight * _kl(log_t, log_s) + (1.0 - mixed_weight) * _kl(log_s, log_t)


def topk_self_distillation_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_indices: Tensor,
    mask: Tensor,
    *,
    divergence: str = "reverse",
    mixed_weight: float = 0.5,
    tail_bucket: bool = False,
) -> Tensor:
    """Mean per-position divergence over ``mask`` ``[B, T]``, from precomputed teacher top-k.

    Returns a zero attached to ``student_logits``' graph when the mask is empty.
    """
    _check_shape("mask", mask.shape, "student_logits[..., 0]", student_logits.shape[:-1])
    per_token = per_token_divergence(
        student_logits,
        teacher_logprobs,
        teacher_indices,
        divergence=divergence,
        mixed_weight=mixed_weight,
        tail_bucket=tail_bucket,
    )
    keep = mask.bool()
    # where, not multiply: masked-out positions may hold inf and inf * 0 is NaN
    total = torch.where(keep, per_token, torch.zeros_like(per_token)).sum()
    return total / keep.sum().clamp(min=1)


def self_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    divergence: str = "reverse",
    top_k: int | None = 64,
    mixed_weight: float = 0.5,
    tail_bucket: bool = False,
) -> Tensor:
    """Masked mean divergence between student and (frozen) teacher logits, both ``[B, T, V]``.

    ``top_k=None`` uses the full vocabulary. No gradient reaches ``teacher_logits``.
    """
    _check_shape("teacher_logits", teacher_logits.shape, "student_logits", student_logits.shape)
    _check_options(divergence, mixed_weight)
    teacher_logprobs, teacher_indices = teacher_topk(teacher_logits, top_k)
    return topk_self_distillation_loss(
        student_logits,
        teacher_logprobs,
        teacher_indices,
        mask,
        divergence=divergence,
        mixed_weight=mixed_weight,
        tail_bucket=tail_bucket,
    )
