"""The Phase 2 step's fast path (LM head only at target positions, top-k from the logits, sorted
micro-batches, one host copy per step) against the plain path written the obvious way: full-vocabulary
logits at every position, gathered afterwards, full log-softmax, one micro-batch.

Models: the shipped lab model (vocabulary 320) and a tiny random Qwen2 built here with a 4096-token
vocabulary, so the top-k support is a small part of it; also the lab model under a peft LoRA wrapper."""

import random

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sdzero.distill import DistillConfig, micro_batch_divergence, micro_batch_tensors
from sdzero.modeling import Teacher, frozen_copy
from sdzero.losses import per_token_divergence
from sdzero.prompts import ControlPhrases, bridge_ids, distill_layout, end_of_turn_ids, generator_prompt_ids
from sdzero.training import gather_positions, logits_at


def plain_step_loss(student, teacher, layouts, pad_id, cfg):
    """Reference: full logits everywhere, gathered at the targets, full log-softmax, top-k of the log-probs."""
    s_ids, s_att, t_ids, t_att, s_pos, t_pos, mask = micro_batch_tensors(layouts, pad_id, "cpu")
    with torch.no_grad():
        t_logprobs = torch.log_softmax(gather_positions(teacher(input_ids=t_ids, attention_mask=t_att).logits,
                                                        t_pos).double(), dim=-1)
        if cfg.top_k is None:
            t_values, t_indices = t_logprobs, torch.arange(t_logprobs.size(-1)).expand(t_logprobs.shape)
        else:
            t_values, t_indices = t_logprobs.topk(cfg.top_k, dim=-1)
    s_logits = gather_positions(student(input_ids=s_ids, attention_mask=s_att).logits, s_pos)
    per_token = per_token_divergence(s_logits, t_values.float(), t_indices, divergence=cfg.divergence,
                                     mixed_weight=cfg.mixed_weight, tail_bucket=cfg.tail_bucket)
    return per_token[mask].sum() / mask.sum(), per_token.detach().masked_fill(~mask, 0).sum(1)


def micro_batch_loss(student, teacher, layouts, n_tokens, pad_id, cfg):
    """As distill() uses `micro_batch_divergence`: the micro-batch's share of the step's mean, and per-sample sums."""
    per_token, _ = micro_batch_divergence(student, teacher, layouts, pad_id, "cpu", cfg)
    return per_token.sum() / n_tokens, per_token.detach().sum(1)


def lab_layouts(tokenizer, n=6, seed=0):
    """Phase 2 layouts of made-up responses of different lengths, both rewards (both bridges)."""
    rng = random.Random(seed)
    eot = end_of_turn_ids(tokenizer)
    layouts, rewards = [], []
    for i in range(n):
        prompt = generator_prompt_ids(tokenizer, f"Add {rng.randint(10, 999)} and {rng.randint(10, 999)}.")
        body = tokenizer.encode(" ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 25))),
                                add_special_tokens=False)
        response = body + [tokenizer.eos_token_id] if i % 3 else body  # some cut by max_new_tokens
        reward = float(i % 2)
        layouts.append(distill_layout(prompt, response, bridge_ids(tokenizer, ControlPhrases(), reward), eot))
        rewards.append(reward)
    return layouts


def tiny_big_vocab_model(vocab=4096, seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, initializer_range=0.2)  # peaked, not uniform, logits
    return Qwen2ForCausalLM(config).eval()


def perturbed(model, seed):
    """A student that differs from its teacher, as after some training, so the divergence is not zero."""
    student = frozen_copy(model)
    student.requires_grad_(True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return student.train()


def head_input_widths(model):
    """Records the sequence width of every input the model's LM head sees (the fast path feeds it T, not L)."""
    widths = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: widths.append(args[0].shape[1]))
    return widths


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def models(lab_model_and_tokenizer):
    lab_model, tokenizer = lab_model_and_tokenizer
    big = tiny_big_vocab_model()
    # the teacher as distill() makes it: a frozen copy behind the Teacher wrapper
    return {"lab": (perturbed(lab_model, 1), Teacher(lab_model), tokenizer),
            "vocab4096": (perturbed(big, 2), Teacher(big), tokenizer)}


@pytest.mark.parametrize("name", ["lab", "vocab4096"])
def test_logits_at_matches_full_logits(models, name):
    student, _, tokenizer = models[name]
    s_ids, s_att, _, _, s_pos, _, _ = micro_batch_tensors(lab_layouts(tokenizer), tokenizer.pad_token_id, "cpu")
    full = gather_positions(student(input_ids=s_ids, attention_mask=s_att).logits, s_pos)
    fast = logits_at(student, s_ids, s_att, s_pos)
    assert fast.shape == full.shape == (*s_pos.shape, student.config.vocab_size)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    # the hook is gone afterwards: a plain call returns logits at every position again
    assert student(input_ids=s_ids, attention_mask=s_att).logits.shape[1] == s_ids.shape[1]


@pytest.mark.parametrize("name", ["lab", "vocab4096"])
@pytest.mark.parametrize("divergence,top_k,tail_bucket", [("reverse", 64, False), ("mixed", 16, True),
                                                          ("forward", None, False)])
def test_micro_batch_loss_matches_plain_path(models, name, divergence, top_k, tail_bucket):
    student, teacher, tokenizer = models[name]
    layouts = lab_layouts(tokenizer, n=7, seed=3)
    pad_id = tokenizer.pad_token_id
    cfg = DistillConfig(divergence=divergence, top_k=top_k, tail_bucket=tail_bucket, mixed_weight=0.3)

    student.zero_grad(set_to_none=True)
    want_loss, want_per_sample = plain_step_loss(student, teacher, layouts, pad_id, cfg)
    want_loss.backward()
    want_grads = grads(student)

    # the trainer's way: sorted by teacher length, micro-batches of 3, each divided by the step's tokens
    student.zero_grad(set_to_none=True)
    n_tokens = sum(l.n_targets for l in layouts)
    order = sorted(range(len(layouts)), key=lambda i: len(layouts[i].teacher_ids))
    total, per_sample = 0.0, torch.zeros(len(layouts))
    for start in range(0, len(order), 3):
        chunk = order[start:start + 3]
        loss, kl = micro_batch_loss(student, teacher, [layouts[i] for i in chunk], n_tokens, pad_id, cfg)
        loss.backward()
        total += loss.item()
        per_sample[chunk] = kl
    got_grads = grads(student)

    assert want_loss.item() > 1e-4  # the student differs from the teacher, so the comparison means something
    torch.testing.assert_close(torch.tensor(total), want_loss.detach(), atol=1e-6, rtol=1e-3)
    torch.testing.assert_close(per_sample, want_per_sample, atol=1e-5, rtol=1e-3)
    assert got_grads.keys() == want_grads.keys()
    for key, want in want_grads.items():
        # float32 rounding differs between the paths (and the tail bucket's log(1 - mass) amplifies it):
        # compare against the scale of each gradient
        torch.testing.assert_close(got_grads[key], want, atol=1e-4 * want.abs().max().item(), rtol=1e-3)


def test_logits_at_through_peft_wrapper(models):
    peft = pytest.importorskip("peft")
    student, teacher, tokenizer = models["lab"]
    wrapped = peft.get_peft_model(frozen_copy(student), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layouts = lab_layouts(tokenizer)
    s_ids, s_att, _, _, s_pos, _, _ = micro_batch_tensors(layouts, tokenizer.pad_token_id, "cpu")
    full = gather_positions(wrapped(input_ids=s_ids, attention_mask=s_att).logits, s_pos)
    widths = head_input_widths(wrapped)
    torch.testing.assert_close(logits_at(wrapped, s_ids, s_att, s_pos), full, atol=1e-5, rtol=1e-5)
    assert widths == [s_pos.shape[1]]
    # gradients reach the LoRA weights through the gathered head
    loss, _ = micro_batch_loss(wrapped, teacher, layouts, sum(l.n_targets for l in layouts), tokenizer.pad_token_id,
                               DistillConfig())
    loss.backward()
    lora_grads = [p.grad for n, p in wrapped.named_parameters() if "lora_" in n and p.requires_grad]
    assert lora_grads and any(g is not None and g.abs().sum() > 0 for g in lora_grads)

    # a LoRA student's default teacher is the same model with its adapter switched off
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # an adapter that changes the outputs, as after training
    adapter_off = Teacher(wrapped)
    assert adapter_off.adapter_off
    _, _, t_ids, t_att, _, t_pos, _ = micro_batch_tensors(layouts, tokenizer.pad_token_id, "cpu")
    want = gather_positions(adapter_off(input_ids=t_ids, attention_mask=t_att).logits, t_pos)
    got = logits_at(adapter_off, t_ids, t_att, t_pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with_adapter = logits_at(wrapped, t_ids, t_att, t_pos)
    assert (got - with_adapter).abs().max() > 1e-3


def test_logits_at_falls_back_when_the_head_is_not_called_on_hidden_states(models):
    """A model whose forward does not run its output-embedding module on [B, L, H] hidden states (here: the
    head applied as a plain matmul with the module's weight) still gets correct logits at the positions."""
    student, _, tokenizer = models["vocab4096"]

    class HeadAsMatmul(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, attention_mask):
            hidden = self.inner.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return type("Out", (), {"logits": hidden @ self.inner.lm_head.weight.T})()

    model = HeadAsMatmul(student)
    s_ids, s_att, _, _, s_pos, _, _ = micro_batch_tensors(lab_layouts(tokenizer), tokenizer.pad_token_id, "cpu")
    want = gather_positions(student(input_ids=s_ids, attention_mask=s_att).logits, s_pos)
    torch.testing.assert_close(logits_at(model, s_ids, s_att, s_pos), want, atol=1e-5, rtol=1e-5)


def test_logits_at_through_ddp_wrapper(models, tmp_path):
    """DistributedDataParallel (one gloo process on CPU, as `accelerate launch` would wrap the student):
    the head is found inside `.module`, and the gradients match the unwrapped model's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    student, teacher, tokenizer = models["vocab4096"]
    layouts = lab_layouts(tokenizer)
    n_tokens = sum(l.n_targets for l in layouts)
    cfg = DistillConfig(top_k=32)
    plain = frozen_copy(student).requires_grad_(True).train()
    want, _ = plain_step_loss(plain, teacher, layouts, tokenizer.pad_token_id, cfg)
    want.backward()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(frozen_copy(student).requires_grad_(True).train())
        widths = head_input_widths(wrapped.module)
        loss, _ = micro_batch_loss(wrapped, teacher, layouts, n_tokens, tokenizer.pad_token_id, cfg)
        loss.backward()
    finally:
        dist.destroy_process_group()
    assert widths == [max(l.n_targets for l in layouts)]  # the head ran on the target rows only
    torch.testing.assert_close(loss.detach(), want.detach(), atol=1e-6, rtol=1e-4)
    for (name, p), (_, q) in zip(wrapped.module.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4 * q.grad.abs().max().item(), rtol=1e-3, msg=name)
