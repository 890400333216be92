"""Are the Phase 2 teacher's targets right? The teacher's most likely token at every step digit of the
student's answers, against the problem's correct digit, on the lab task, for two ways of fitting a
long sample into `teacher_max_length`:

* "second copy cut" (sdzero's rule): the teacher reads the whole first answer; only the loss positions
  past the limit are dropped;
* "both copies cut" (the rule before it): y is cut to the prefix that fits twice, so the teacher reads
  a half-finished first answer, then P_r, a context the reviser never saw in Phase 1.

    python benchmarks/teacher_targets.py --model RUN/srt [--n 128] [--max-length 256] [--seed 0]

Prints, per rule, the share of samples cut and the agreement on cut and on whole samples.
"""

from __future__ import annotations

import argparse

import torch

from sdzero import lab
from sdzero.distill import DistillConfig, micro_batch_divergence
from sdzero.generation import Generator, SamplingConfig
from sdzero.lab.diagnostics import gold_digit_tokens
from sdzero.modeling import Teacher, load_model
from sdzero.prompts import (ControlPhrases, DistillLayout, bridge_ids, distill_layout, end_of_turn_ids,
                            generator_prompt_ids, strip_end_of_turn)
from sdzero.tasks.lab import lab_reward


def both_copies_cut(prompt: list[int], response: list[int], bridge: list[int], eot: set[int],
                    max_length: int) -> DistillLayout | None:
    """The earlier rule: y cut in both copies (and the student's input) to the longest prefix that fits."""
    room = (max_length - len(prompt) - len(bridge)) // 2
    if room < 1:
        return None
    cut = response[:room]
    first = strip_end_of_turn(cut, eot)
    start = len(prompt) + len(first) + len(bridge) - 1
    return DistillLayout(prompt + cut, prompt + first + bridge + cut, list(range(len(prompt) - 1, len(prompt) - 1 + len(cut))),
                         list(range(start, start + len(cut))), truncated=len(cut) < len(response))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=256, help="teacher_max_length for both rules")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device="cpu")
    teacher = Teacher(model)  # teacher = the model itself, frozen: Phase 2's first step
    eot, phrases = end_of_turn_ids(tokenizer), ControlPhrases()
    problems = lab.problem_sets(1, 1, args.n, seed=args.seed)[2]
    generator = Generator(model, tokenizer, SamplingConfig(max_new_tokens=args.max_new_tokens))
    prompts = [generator_prompt_ids(tokenizer, p["problem"]) for p in problems]
    samples = [s[0] for s in generator.sample(prompts, 1, progress=False)]
    cfg = DistillConfig()
    rules = {"second copy cut": lambda p, y, b: distill_layout(p, y, b, eot, args.max_length),
             "both copies cut": lambda p, y, b: both_copies_cut(p, y, b, eot, args.max_length)}
    print(f"{args.n} answers of {args.model}, teacher_max_length {args.max_length}")
    for name, rule in rules.items():
        counts = {True: [0, 0], False: [0, 0]}  # cut? -> [hits, digits]
        n_cut = 0
        for prompt, y, problem in zip(prompts, samples, problems):
            bridge = bridge_ids(tokenizer, phrases, lab_reward(y.text, problem))
            layout = rule(prompt, list(y.ids), bridge)
            if layout is None:
                continue
            n_cut += layout.truncated
            with torch.no_grad():
                _, diagnostics = micro_batch_divergence(model, teacher, [layout], tokenizer.pad_token_id, "cpu", cfg)
            top = diagnostics["teacher_top"][0].tolist()
            for t, token in gold_digit_tokens(tokenizer, y, problem):
                if t < layout.n_targets:
                    counts[layout.truncated][0] += top[t] == token
                    counts[layout.truncated][1] += 1
        share = lambda c: f"{c[0] / c[1]:.3f} ({c[1]} digits)" if c[1] else "n/a"  # noqa: E731
        print(f"{name:>16}: {n_cut} of {args.n} samples cut; teacher's top token = correct digit: "
              f"cut samples {share(counts[True])}, whole samples {share(counts[False])}")


if __name__ == "__main__":
    main()
