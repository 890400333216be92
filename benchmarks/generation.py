"""Sampling speed of the backends on the same prompts: transformers `generate`, sdzero's decoding loop
(`Generator`, which drops each answer once it has ended) and vLLM (`VLLMGenerator`).

Each backend samples `--n` answers to each of `--prompts` prompts with the same `SamplingConfig`, in
rounds that rotate their order after one warm-up round each; figures are medians over the rounds. Models:

* `lab`: the shipped lab model (0.9M parameters), with its own answers (they end on their own, ~40 tokens);
* `qwen3`: a random-weight Qwen3 of ~50M parameters (`--hidden`, `--layers`) with the lab tokenizer. Its
  answers are random tokens, so they run to `--max-new-tokens` or stop by chance at the end-of-turn token;
* a real model by name or folder (`--model smollm2-135m-instruct`), on reasoning-gym chain_sum prompts (two
  one-digit terms, the last-number instruction: the model's preset).

Needs vLLM: run it in the venv `make test-vllm` builds (vLLM's CPU build), or on a GPU with `sdzero[vllm]`.

    .venv-vllm/bin/python benchmarks/generation.py --model lab
    .venv-vllm/bin/python benchmarks/generation.py --model qwen3 --max-new-tokens 256
    .venv-vllm/bin/python benchmarks/generation.py --model lab --vllm-eager   # vLLM without torch.compile
    .venv-vllm/bin/python benchmarks/generation.py --model smollm2-135m-instruct --temperature 0.7

Output is one `name: value` line per figure (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from sdzero import lab  # noqa: E402
from sdzero.generation import Generator, SamplingConfig, VLLMGenerator  # noqa: E402
from sdzero.pipeline import load_model  # noqa: E402
from sdzero.prompts import generator_prompt_ids  # noqa: E402


def report(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4g}"
    print(f"{name}: {value}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lab", help="lab, qwen3, or a real model by name or folder")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per backend, after the warm-up")
    parser.add_argument("--batch-size", type=int, default=256, help="transformers backend's batch")
    parser.add_argument("--hidden", type=int, default=512, help="qwen3: hidden size")
    parser.add_argument("--layers", type=int, default=12, help="qwen3: decoder layers")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count())
    parser.add_argument("--vllm-eager", action="store_true", help="sampling.vllm_enforce_eager: vLLM without torch.compile")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def random_qwen3(tokenizer, hidden: int, layers: int):
    """A Qwen3 of the given width and depth with random weights, over the lab tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    heads = hidden // 64
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # before vLLM starts: its CPU worker pins the thread count
    torch.manual_seed(args.seed)
    lab_like = args.model in ("lab", "qwen3")
    model, tokenizer = load_model("lab" if lab_like else args.model, device="cpu")
    if args.model == "qwen3":
        model = random_qwen3(tokenizer, args.hidden, args.layers)
    report("model", args.model)
    report("parameters_m", sum(p.numel() for p in model.parameters()) / 1e6)
    report("threads", torch.get_num_threads())
    if lab_like:
        rows = lab.problem_sets(0, args.prompts, 0, seed=args.seed)[1]
    else:
        from sdzero.data import DataConfig, generated_problem_sets

        data = DataConfig(source="reasoning-gym:chain_sum", answer_rule="last-number",
                          options={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
        rows = generated_problem_sets(data, "reasoning-gym", 0, args.prompts, 0, args.seed).n2
    prompts = [generator_prompt_ids(tokenizer, row["problem"]) for row in rows]
    sampling = SamplingConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, vllm_enforce_eager=args.vllm_eager)

    generate = Generator(model, tokenizer, sampling)
    generate.drop_finished = False  # transformers `generate`, every row decoded until the batch's last one ends
    start = time.perf_counter()
    backends = {"generate": generate, "loop": Generator(model, tokenizer, sampling),
                "vllm": VLLMGenerator(model, tokenizer, sampling)}
    report("vllm_engine_start_s", time.perf_counter() - start)

    times = {name: [] for name in backends}
    tokens = {name: [] for name in backends}
    for round_ in range(args.rounds + 1):  # round 0 warms up each backend and is not counted
        names = list(backends)
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            start = time.perf_counter()
            samples = backends[name].sample(prompts, args.n, progress=False)
            seconds = time.perf_counter() - start
            if round_:
                times[name].append(seconds)
                tokens[name].append(sum(len(s.ids) for per_prompt in samples for s in per_prompt))
    count = args.prompts * args.n
    for name in backends:
        seconds = statistics.median(times[name])
        report(f"{name}_samples_per_s", count / seconds)
        report(f"{name}_tokens_per_s", statistics.median(t / s for t, s in zip(tokens[name], times[name])))
        report(f"{name}_mean_answer_tokens", statistics.mean(tokens[name]) / count)
        report(f"{name}_round_s_all", " ".join(f"{s:.2f}" for s in times[name]))
    for name in ("generate", "loop"):
        report(f"vllm_over_{name}_samples_per_s", statistics.median(times[name]) / statistics.median(times["vllm"]))
    report("loop_over_generate_samples_per_s", statistics.median(times["generate"]) / statistics.median(times["loop"]))


if __name__ == "__main__":
    main()
