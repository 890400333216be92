"""The transformers backend's decoding loop against transformers `generate`, side by side.

`Generator` decodes token by token and drops each row from the batch once its answer has ended;
`generate` keeps decoding every row until the batch's last answer ends, so one answer cut at
`max_new_tokens` keeps the whole batch running at full width. Both sample `--prompts` lab problems at
the demo's settings (T = 1, 256 new tokens, one batch of 256) in rounds that alternate their order, after
one warm-up round each; times are medians over the rounds.

The same rounds give what the two draw: answers cut at max_new_tokens, mean length and accuracy, summed
over the rounds. The loop samples from the same distribution as `generate` (greedily the two agree token
for token, tests/test_generation.py), so these should differ only by chance.

    .venv/bin/python benchmarks/decoding.py
    .venv/bin/python benchmarks/decoding.py --model lab --rounds 5

Output is one `name: value` line per figure (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from sdzero import lab  # noqa: E402
from sdzero.generation import Generator, SamplingConfig  # noqa: E402
from sdzero.pipeline import load_model  # noqa: E402
from sdzero.prompts import generator_prompt_ids  # noqa: E402
from sdzero.tasks.lab import lab_reward  # noqa: E402


def report(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4g}"
    print(f"{name}: {value}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lab-v2", choices=list(lab.LAB_MODELS))
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per path, after the warm-up")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, device="cpu")
    _, rows, _ = lab.problem_sets(0, args.prompts, 0, seed=5)
    prompts = [generator_prompt_ids(tokenizer, row["problem"]) for row in rows]
    generator = Generator(model, tokenizer, SamplingConfig(max_new_tokens=args.max_new_tokens,
                                                           batch_size=args.batch_size))
    paths = {"loop": True, "generate": False}  # name -> Generator.drop_finished
    seconds = {name: [] for name in paths}
    drawn = {name: [] for name in paths}
    for round_ in range(args.rounds + 1):
        for name in (list(paths) if round_ % 2 == 0 else list(paths)[::-1]):
            generator.drop_finished = paths[name]
            torch.manual_seed(round_)
            start = time.perf_counter()
            samples = [per_prompt[0] for per_prompt in generator.sample(prompts, 1, progress=False)]
            if round_ > 0:  # round 0 warms up
                seconds[name].append(time.perf_counter() - start)
                drawn[name] += [(s, row) for s, row in zip(samples, rows)]

    report("prompts", len(prompts))
    report("rounds", args.rounds)
    for name in paths:
        samples = [s for s, _ in drawn[name]]
        report(f"{name}_seconds_median", statistics.median(seconds[name]))
        report(f"{name}_cut", f"{sum(not s.finished for s in samples)} of {len(samples)}")
        report(f"{name}_mean_length", statistics.mean(len(s.ids) for s in samples))
        report(f"{name}_accuracy", statistics.mean(lab_reward(s.text, row) if s.finished else 0.0
                                                   for s, row in drawn[name]))
    report("generate_over_loop", statistics.median(seconds["generate"]) / statistics.median(seconds["loop"]))


if __name__ == "__main__":
    main()
