import math

import pytest
import torch
import torch.nn.functional as F

from sdzero.losses import (
    DIVERGENCES,
    per_token_divergence,
    self_distillation_loss,
    sft_loss,
    teacher_topk,
    topk_self_distillation_loss,
)

B, T, V = 2, 3, 11
TOP_KS = [1, 3, V, None]


def make_logits(seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * scale
    teacher = torch.randn(B, T, V, generator=g) * scale
    return student, teacher


def make_mask(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    mask[1] = False  # one row entirely masked out
    return mask


def kl_terms(p: list, q: list):
    """sum p log(p / q), skipping p == 0, written term by term."""
    total = 0.0
    for pi, qi in zip(p, q):
        if float(pi.detach()) > 0:
            total = total + pi * torch.log(pi / qi)
    return total


def reference_loss(student, teacher, mask, divergence, top_k, mixed_weight=0.5, tail_bucket=False):
    """Loops over positions in float64; differentiable w.r.t. ``student``."""
    vocab = student.shape[-1]
    k = vocab if top_k is None else min(top_k, vocab)
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not bool(mask[b, t]):
                continue
            p_s = torch.softmax(student[b, t].double(), dim=-1)
            p_t = torch.softmax(teacher[b, t].detach().double(), dim=-1)
            support = sorted(range(vocab), key=lambda i: -float(p_t[i]))[:k]
            ps = [p_s[i] for i in support]
            pt = [p_t[i] for i in support]
            if tail_bucket and k < vocab:
                ps.append(1 - sum(ps))
                pt.append(1 - sum(pt))
            else:
                zs, zt = sum(ps), sum(pt)
                ps = [x / zs for x in ps]
                pt = [x / zt for x in pt]
            fwd = kl_terms(pt, ps)
            rev = kl_terms(ps, pt)
            if divergence == "forward":
                value = fwd
            elif divergence == "reverse":
                value = rev
            else:
                value = mixed_weight * fwd + (1 - mixed_weight) * rev
            total = total + value
            count += 1
    if count == 0:
        return student.double().sum() * 0
    return total / count


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail_bucket", [False, True])
@pytest.mark.parametrize("top_k", TOP_KS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(divergence, tail_bucket, top_k, seed):
    student, teacher = make_logits(seed)
    mask = make_mask(seed + 100)
    got = self_distillation_loss(student, teacher, mask, divergence=divergence, top_k=top_k, tail_bucket=tail_bucket)
    want = reference_loss(student, teacher, mask, divergence, top_k, tail_bucket=tail_bucket)
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail_bucket", [False, True])
@pytest.mark.parametrize("top_k", [1, 3, None])
def test_gradient_matches_reference(divergence, tail_bucket, top_k):
    student, teacher = make_logits(7)
    mask = make_mask(8)

    s = student.clone().requires_grad_(True)
    self_distillation_loss(s, teacher, mask, divergence=divergence, top_k=top_k, tail_bucket=tail_bucket).backward()

    s_ref = student.double().requires_grad_(True)
    reference_loss(s_ref, teacher, mask, divergence, top_k, tail_bucket=tail_bucket).backward()

    torch.testing.assert_close(s.grad.double(), s_ref.grad, atol=1e-5, rtol=1e-4)
    assert s.grad[~mask].abs().max() == 0


@pytest.mark.parametrize("tail_bucket", [False, True])
@pytest.mark.parametrize("top_k", [3, None])
def test_mixed_is_weighted_sum(tail_bucket, top_k):
    student, teacher = make_logits(3)
    mask = torch.ones(B, T, dtype=torch.bool)
    kw = dict(top_k=top_k, tail_bucket=tail_bucket)
    fwd = self_distillation_loss(student, teacher, mask, divergence="forward", **kw)
    rev = self_distillation_loss(student, teacher, mask, divergence="reverse", **kw)

    def mixed(w):
        return self_distillation_loss(student, teacher, mask, divergence="mixed", mixed_weight=w, **kw)

    torch.testing.assert_close(mixed(1.0), fwd)
    torch.testing.assert_close(mixed(0.0), rev)
    torch.testing.assert_close(mixed(0.3), 0.3 * fwd + 0.7 * rev)


def test_teacher_gets_no_gradient():
    student, teacher = make_logits(4)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    mask = torch.ones(B, T)
    for divergence in DIVERGENCES:
        for tail_bucket in (False, True):
            loss = self_distillation_loss(student, teacher, mask, divergence=divergence, top_k=3, tail_bucket=tail_bucket)
            loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail_bucket", [False, True])
@pytest.mark.parametrize("top_k", TOP_KS)
def test_identical_logits_give_zero(divergence, tail_bucket, top_k):
    student, _ = make_logits(5)
    mask = torch.ones(B, T)
    loss = self_distillation_loss(student, student.clone(), mask, divergence=divergence, top_k=top_k, tail_bucket=tail_bucket)
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_masked_returns_connected_zero(divergence):
    student, teacher = make_logits(6)
    student.requires_grad_(True)
    mask = torch.zeros(B, T, dtype=torch.long)
    loss = self_distillation_loss(student, teacher, mask, divergence=divergence, top_k=3)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_integer_mask_matches_bool_mask():
    student, teacher = make_logits(9)
    mask = make_mask(10)
    a = self_distillation_loss(student, teacher, mask, top_k=3)
    b = self_distillation_loss(student, teacher, mask.long(), top_k=3)
    torch.testing.assert_close(a, b)


def test_topk_variant_matches_full():
    student, teacher = make_logits(11)
    mask = make_mask(12)
    for top_k in TOP_KS:
        logprobs, indices = teacher_topk(teacher, top_k)
        for divergence in DIVERGENCES:
            for tail_bucket in (False, True):
                kw = dict(divergence=divergence, mixed_weight=0.3, tail_bucket=tail_bucket)
                got = topk_self_distillation_loss(student, logprobs, indices, mask, **kw)
                want = self_distillation_loss(student, teacher, mask, top_k=top_k, **kw)
                torch.testing.assert_close(got, want)


def test_teacher_topk_values():
    _, teacher = make_logits(13)
    teacher.requires_grad_(True)
    full = torch.log_softmax(teacher.detach().double(), dim=-1)

    logprobs, indices = teacher_topk(teacher, 3)
    assert logprobs.shape == indices.shape == (B, T, 3)
    assert logprobs.dtype == torch.float32 and not logprobs.requires_grad
    assert torch.all(logprobs[..., :-1] >= logprobs[..., 1:])
    torch.testing.assert_close(logprobs.double(), full.gather(-1, indices), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logprobs.double(), full.sort(dim=-1, descending=True).values[..., :3], atol=1e-6, rtol=1e-6)

    for top_k in (None, V, V + 5):
        logprobs, indices = teacher_topk(teacher, top_k)
        assert indices.shape == (B, T, V)
        assert torch.equal(indices.sort(dim=-1).values, torch.arange(V).expand(B, T, V))
        torch.testing.assert_close(logprobs.double(), full.gather(-1, indices), atol=1e-6, rtol=1e-6)


def test_per_token_divergence_shape_and_sign():
    student, teacher = make_logits(14)
    logprobs, indices = teacher_topk(teacher, 3)
    for divergence in DIVERGENCES:
        for tail_bucket in (False, True):
            d = per_token_divergence(student, logprobs, indices, divergence=divergence, tail_bucket=tail_bucket)
            assert d.shape == (B, T)
            assert torch.all(d >= -1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("top_k", [1, V - 1])
def test_tail_bucket_finite_when_topk_holds_all_mass(divergence, top_k):
    student, teacher = make_logits(15)
    teacher[..., 0] = 50.0
    student[0, :, 0] = 50.0  # student side saturated too on one row
    student.requires_grad_(True)
    mask = torch.ones(B, T)
    loss = self_distillation_loss(student, teacher, mask, divergence=divergence, top_k=top_k, tail_bucket=True)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.all(torch.isfinite(student.grad))


def test_zero_probability_terms_contribute_nothing():
    student, teacher = make_logits(16)
    teacher[0, 0, :4] = -math.inf
    student[1, 1, :4] = -math.inf
    # forward KL is genuinely infinite where only the student has zero mass, so leave [1, 1] out
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 1] = False

    s = student.clone().requires_grad_(True)
    fwd = self_distillation_loss(s, teacher, mask, divergence="forward", top_k=None)
    fwd.backward()
    assert torch.isfinite(fwd) and torch.all(torch.isfinite(s.grad))
    torch.testing.assert_close(fwd.double(), reference_loss(student, teacher, mask, "forward", None), atol=1e-5, rtol=1e-5)

    # student zeros with reverse KL: p_S = 0 terms vanish, gradient stays finite
    _, teacher = make_logits(17)
    s = student.clone().requires_grad_(True)
    rev = self_distillation_loss(s, teacher, torch.ones(B, T), divergence="reverse", top_k=None)
    rev.backward()
    assert torch.isfinite(rev) and torch.all(torch.isfinite(s.grad))
    want = reference_loss(student, teacher, torch.ones(B, T), "reverse", None)
    torch.testing.assert_close(rev.double(), want, atol=1e-5, rtol=1e-5)


def test_sft_loss_matches_cross_entropy():
    g = torch.Generator().manual_seed(17)
    logits = (torch.randn(B, T, V, generator=g) * 2).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1] = -100
    labels[1, 2] = -100
    got = sft_loss(logits, labels)
    want = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, want)

    # ignored positions may hold anything without changing the loss or receiving gradient
    poked = logits.detach().clone()
    poked[0, 1] += 100.0
    torch.testing.assert_close(sft_loss(poked, labels), got.detach())
    got.backward()
    assert logits.grad[0, 1].abs().max() == 0


def test_sft_loss_bf16_and_custom_ignore_index():
    g = torch.Generator().manual_seed(18)
    logits = torch.randn(B, T, V, generator=g).bfloat16()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0] = -1
    got = sft_loss(logits, labels, ignore_index=-1)
    assert got.dtype == torch.float32
    want = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(got, want)


def test_sft_loss_all_ignored():
    logits = torch.randn(B, T, V, requires_grad=True)
    labels = torch.full((B, T), -100)
    loss = sft_loss(logits, labels)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_bad_inputs():
    student, teacher = make_logits(19)
    mask = torch.ones(B, T)
    with pytest.raises(ValueError, match=r"unknown divergence 'jsd'.*forward, reverse, mixed"):
        self_distillation_loss(student, teacher, mask, divergence="jsd")
    with pytest.raises(ValueError, match=r"top_k must be >= 1 or None"):
        self_distillation_loss(student, teacher, mask, top_k=0)
    with pytest.raises(ValueError, match=r"mixed_weight must be in \[0, 1\]"):
        self_distillation_loss(student, teacher, mask, divergence="mixed", mixed_weight=1.5)
    with pytest.raises(ValueError, match=r"shape mismatch.*\(2, 3, 10\).*\(2, 3, 11\)"):
        self_distillation_loss(student, teacher[..., :10], mask)
    with pytest.raises(ValueError, match=r"shape mismatch.*mask.*\(2, 2\).*\(2, 3\)"):
        self_distillation_loss(student, teacher, mask[:, :2])
    with pytest.raises(ValueError, match=r"shape mismatch.*labels"):
        sft_loss(student, torch.zeros(B, T + 1, dtype=torch.long))
    logprobs, indices = teacher_topk(teacher, 3)
    with pytest.raises(ValueError, match=r"unknown divergence"):
        per_token_divergence(student, logprobs, indices, divergence="kl")
    with pytest.raises(ValueError, match=r"shape mismatch"):
        per_token_divergence(student, logprobs[..., :2], indices)
