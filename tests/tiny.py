"""A tiny Hugging Face causal LM built on the spot: a byte-level BPE trained with `tokenizers`, wrapped
as a fast tokenizer with its own chat template, and a random Llama. Nothing is downloaded.

Also the reward function the tests name by import path (`tiny:even_length`): an arbitrary but
deterministic verdict, so a random model gets both rewards and Phase 1 keeps revisions.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|user|>' if message['role'] != 'assistant' else '<|assistant|>' }}{{ message['content'] }}{{ '<|end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)
SPECIALS = ["<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = ["What is 2 + 3? The answer is \\boxed{5}.", "Wait, this response is not correct, let me start over.",
          "Let me rephrase the above solution.", "Compute 7 times 6 and give the result: 42."]


def build_tiny_model(path: Path, *, vocab_size: int = 300, hidden_size: int = 32, layers: int = 2) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|end|>",
                                        additional_special_tokens=SPECIALS[1:3])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # A random model almost never samples its end-of-turn token; a trained one ends its answers. This
    # raises the end token's score after a few tokens (saved with the model), so most answers finish
    # and Phase 1, which keeps only finished answers, has revisions to keep.
    model.generation_config.exponential_decay_length_penalty = (2, 3.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_problems(path: Path, n: int) -> Path:
    """A JSONL of simple math rows in the field names of common datasets (question / solution)."""
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i + 1}?",
                                "solution": f"Add them: \\boxed{{{2 * i + 1}}}"}) + "\n")
    return path


def tiny_home(home: Path, n_problems: int, settings: dict) -> Path:
    """HOME with the tiny model (HOME/tiny), `n_problems` problems (HOME/problems.jsonl) and HOME/run.yaml: a run
    config for them, judged by tiny:even_length, with `settings` on top."""
    import yaml

    build_tiny_model(home / "tiny")
    write_problems(home / "problems.jsonl", n_problems)
    config = {"model": str(home / "tiny"), "task": "tiny:even_length",
              "data": {"path": str(home / "problems.jsonl")}, **settings}
    (home / "run.yaml").write_text(yaml.safe_dump(config))
    return home


def even_length(completion: str, row: dict) -> float:
    return 1.0 if len(completion) % 2 == 0 else 0.0


def sdzero(home: Path, *args) -> int:
    """`sdzero ARGS` in this process, with the run config HOME/run.yaml."""
    from sdzero.cli import main

    return main([*map(str, args), "--config", str(home / "run.yaml"), "--quiet"])


def refused(home: Path, capsys, *args) -> str:
    """Run a command that must be refused; returns its one-line error."""
    capsys.readouterr()
    assert sdzero(home, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def hold_at(signal_dir: Path, point: str) -> Path:
    """The FIFO at which a run started with SDZERO_TEST_SIGNAL_DIR=signal_dir waits when it gets to `point`
    (see sdzero.training.reached); make it before the run starts."""
    signal_dir.mkdir(parents=True, exist_ok=True)
    fifo = signal_dir / point
    os.mkfifo(fifo)
    return fifo


def stop_at(process, fifo: Path, sig: int = signal.SIGKILL, timeout: float = 300) -> int:
    """Wait until `process` waits at `fifo` (made by `hold_at`), send it `sig` there and return its exit code
    (-sig when the signal ended it). The FIFO is removed, so a resumed run goes past the point."""
    deadline = time.time() + timeout
    while True:
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # opens once the run is reading the FIFO
            break
        except OSError:  # no reader yet
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise AssertionError(f"the run did not get to {fifo.name} (exit code {process.wait()})") from None
            time.sleep(0.05)
    try:
        process.send_signal(sig)
        return process.wait(timeout=timeout)
    finally:
        os.close(writer)
        fifo.unlink()
