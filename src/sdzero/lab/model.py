"""The lab base model: a tiny Qwen2 causal LM and a BPE tokenizer with a chat template, trained here.

`pretrain` writes a corpus of worked lab solutions that is imperfect on purpose, as real
pretraining corpora are: carry steps slip at `slip_rate`, a share of wrong attempts is followed by
"start over" and a fresh attempt, and a few right ones by "rephrase" and a copy. The model it
trains therefore makes mistakes (sampled accuracy well below 100%): the raw material SD-Zero works on.

Three recipes (`PRESETS`):
- "v1", the shipped `lab` model: an attempt after "start over" is written like a first attempt (same
  slips, same operands), so the model's revisions are no better than its first answers.
- "v2": checking is easier than producing, as in real corpora, where a text that starts over is
  usually a careful second look. First attempts also misread an operand now and then; an attempt after
  "start over" re-reads the problem (never copies the wrong attempt's operands) and slips at the lower
  `revision_slip_rate`. Long documents (a first attempt restated several times before it is checked)
  put such careful attempts at every position the Phase 2 teacher reads.
- "control": v2 with no revision advantage: the attempt after "start over" copies the previous
  attempt's operands and slips at `slip_rate`. Everything else (first attempts, long documents, model
  size) is v2's, so what SD-Zero gains on v2 and not here is the revision advantage's doing.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdzero.lab.task import Problem, sample_problems, write_solution, written_operands
from sdzero.prompts import SEPARATOR, ControlPhrases
from sdzero.training import make_schedule, sft_step_loss

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass
class PretrainConfig:
    """Recipe of a lab base model; the defaults are the shipped "v1" model's (about 50% sampled accuracy;
    2 minutes on a GPU, on 2 CPU cores `sdzero.lab.PRETRAIN_CPU_MINUTES`). See `PRESETS`."""

    seed: int = 0
    n_documents: int = 60_000
    """Documents in the pretraining corpus (one worked problem each)."""
    slip_rate: float = 0.3
    """Chance that a carry step of a first attempt slips (adds one too many)."""
    misread_rate: float = 0.0
    """Chance that a step of a first attempt reads its operand wrong (another digit)."""
    revision_slip_rate: float = 0.3
    """Chance that a carry step of an attempt after "start over" slips."""
    revision_reads_problem: bool = True
    """An attempt after "start over" takes its operands from the problem (False: copies the previous
    attempt's, misread ones included)."""
    start_over_rate: float = 0.5
    """Share of wrong corpus attempts followed by the "start over" phrase and a fresh attempt."""
    rephrase_rate: float = 0.2
    """Share of right corpus attempts followed by the "rephrase" phrase and a copy."""
    max_attempts: int = 4
    """Most attempts in one corpus document after its first (and after a long document's restatements)."""
    long_document_rate: float = 0.0
    """Share of long documents: the first attempt, right or wrong, restated ("rephrase" and a copy) 2 to
    `max_restatements` times, then checked: a wrong attempt in it is always followed by "start over"."""
    max_restatements: int = 6
    vocab_size: int = 320
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    steps: int = 2500
    batch_size: int = 64
    micro_batch_size: int = 64
    """Examples per forward pass; a batch is split by length, so long documents pad only each other."""
    lr: float = 1e-3
    warmup_steps: int = 50


# v2 starts over less often than v1 so that its base model, whose revisions are mostly right, still samples
# 40-60% right answers
_V2 = PretrainConfig(misread_rate=0.03, revision_slip_rate=0.05, start_over_rate=0.2, long_document_rate=0.08,
                     max_position_embeddings=1024, micro_batch_size=16)
PRESETS = {
    "v1": PretrainConfig(),
    "v2": _V2,
    "control": replace(_V2, revision_slip_rate=_V2.slip_rate, revision_reads_problem=False),
}
"""The lab's recipes by name (see the module's docstring); `sdzero lab pretrain --preset NAME`."""


def corpus_document(problem: Problem, rng: random.Random, cfg: PretrainConfig,
                    phrases: ControlPhrases) -> str:
    """One worked problem: an attempt, then now and then a control phrase and another attempt.

    A wrong attempt may be followed by "start over" and a revision, a right one by "rephrase" and a
    copy, up to `max_attempts` more attempts, so the model also sees later attempts at later positions
    (as the reviser and the Phase 2 teacher will). A long document first restates its first attempt.
    """
    parts = [write_solution(problem, rng, cfg.slip_rate, cfg.misread_rate)]
    long = cfg.long_document_rate > 0 and rng.random() < cfg.long_document_rate
    if long:
        for _ in range(rng.randint(2, cfg.max_restatements)):
            parts += [phrases.correct, parts[0]]
    for _ in range(cfg.max_attempts - 1):
        right = parts[-1].endswith(f"Answer: {problem.answer}")
        if right and rng.random() < cfg.rephrase_rate:
            parts += [phrases.correct, parts[-1]]
        elif not right and (long or rng.random() < cfg.start_over_rate):  # a long document is checked in the end
            operands = None if cfg.revision_reads_problem else written_operands(parts[-1])
            parts += [phrases.wrong, write_solution(problem, rng, cfg.revision_slip_rate, operands=operands)]
        else:
            break
    return SEPARATOR.join(parts)


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (digits always single tokens) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, unk_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_model(tokenizer, cfg: PretrainConfig):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(config)


def backward_by_length(model, batch: list[tuple[list[int], list[int]]], micro_batch_size: int, pad_id: int) -> float:
    """Backpropagate the batch's mean NLL of its targets in micro-batches of similar length (long documents
    pad only each other); returns that mean."""
    batch = sorted(batch, key=lambda example: len(example[0]) + len(example[1]))
    targets = sum(len(response) for _, response in batch)
    loss = 0.0
    for start in range(0, len(batch), micro_batch_size):
        micro_batch = batch[start:start + micro_batch_size]
        # a micro-batch's mean NLL weighted by its share of the batch's target tokens sums to the batch's mean
        share = sum(len(response) for _, response in micro_batch) / targets
        micro_loss = sft_step_loss(model, [micro_batch], pad_id)[0] * share
        micro_loss.backward()
        loss += micro_loss.item()
    return loss


def pretrain(out_dir: str | Path, cfg: PretrainConfig | None = None, *, progress: bool = True,
             device: str | None = None) -> Path:
    """Build the corpus, the tokenizer and the model, train it, and save it to `out_dir`."""
    from sdzero.prompts import generator_prompt_ids

    cfg = cfg or PretrainConfig()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    phrases = ControlPhrases()
    problems = sample_problems(cfg.n_documents, split="train", seed=cfg.seed)
    documents = [(p, corpus_document(p, rng, cfg, phrases)) for p in problems]
    tokenizer = build_tokenizer([p.text for p, _ in documents[:5000]] + [d for _, d in documents[:5000]]
                                + [phrases.correct, phrases.wrong], cfg.vocab_size)
    eos = tokenizer.eos_token_id
    examples = []
    for problem, document in documents:
        prompt = generator_prompt_ids(tokenizer, problem.text)
        response = tokenizer.encode(document, add_special_tokens=False) + [eos]
        examples.append((prompt, response))

    model = build_model(tokenizer, cfg).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = make_schedule(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="pretrain lab model", disable=not progress)
    loss_log = []
    for step in bar:
        batch = [examples[rng.randrange(len(examples))] for _ in range(cfg.batch_size)]
        optimizer.zero_grad(set_to_none=True)
        loss = backward_by_length(model, batch, cfg.micro_batch_size, tokenizer.pad_token_id)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_log.append(loss)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    out_dir.mkdir(parents=True, exist_ok=True)
    model.cpu().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "lab_pretrain.json").write_text(json.dumps(
        {"recipe": asdict(cfg), "final_loss": sum(loss_log[-20:]) / 20, "seconds": time.time() - start}, indent=2))
    return out_dir

