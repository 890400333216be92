"""What the benchmarks share: the environment they run in, the machine they describe, the models and problems
they time the trainer on, interleaved timing with medians, and their output, one `name: value` line per figure.

Imported by the scripts beside it (`python benchmarks/phase2_step.py` puts this folder on the path); import it
before anything that loads torch or transformers, so the environment below takes effect."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable

# Quiet third-party chatter before transformers is imported anywhere (spawned children inherit the environment).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Idle OpenMP workers sleep instead of spinning. On a shared machine (or under `nice`) a spinning pool waits on a
# preempted sibling at every parallel region, which made 2-thread CPU steps tens of times slower in testing;
# must be set before torch loads its OpenMP runtime. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from sdzero import lab  # noqa: E402
from sdzero.modeling import default_device, load_model  # noqa: E402
from sdzero.tasks import reward_function as task_reward  # noqa: E402
from sdzero.tasks.lab import lab_reward  # noqa: E402

MB = 1024 * 1024
DEVICE = default_device()
"""Where the trainer runs (accelerate's choice: the GPU when there is one); models are loaded there too.
`CUDA_VISIBLE_DEVICES=` runs everything on the CPU."""


# ----------------------------------------------------------------------------------------------------------
# Output


def report(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    print(f"{name}: {value}", flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spaced(values: list[float], digits: int = 3) -> str:
    """Every run of a figure, for its `*_all` line."""
    return " ".join(f"{v:.{digits}f}" for v in values)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report_machine() -> None:
    """The machine, the library versions, the threads and the load a run's figures were measured under."""
    import transformers

    report("machine_cpu_count", os.cpu_count())
    report("machine_platform", platform.platform())
    report("machine_processor", cpu_name())
    report("python_version", platform.python_version())
    report("torch_version", torch.__version__)
    report("transformers_version", transformers.__version__)
    report("torch_threads", torch.get_num_threads())
    report("omp_wait_policy", os.environ.get("OMP_WAIT_POLICY"))
    report("device", DEVICE if DEVICE == "cpu" else torch.cuda.get_device_name())
    report("load_average_1m", f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a")


def begin(args: argparse.Namespace) -> float:
    """The start of a benchmark with sized runs: torch's threads (--threads), then the machine and --quick
    reported; returns the clock its total_runtime_s counts from."""
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    report_machine()
    report("quick", args.quick)
    return began


# ----------------------------------------------------------------------------------------------------------
# Options


def add_sized_options(parser: argparse.ArgumentParser, full: dict, quick: dict, helps: dict[str, str]) -> None:
    """--quick and one integer option per key of `full`; an option left out takes the full-run value, or the
    --quick value with --quick (`apply_sizes`)."""
    parser.add_argument("--quick", action="store_true", help="smoke run: few repetitions, small sizes")
    for key, text in helps.items():
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                            help=f"{text} (full run: {full[key]}, --quick: {quick[key]})")


def sized_parser(doc: str, full: dict, quick: dict, helps: dict[str, str]) -> argparse.ArgumentParser:
    """The parser of a benchmark with sized runs: the first paragraph of its docstring `doc`, --quick and its size
    options (`add_sized_options`) and the task options; the script adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     epilog="Output: one 'name: value' line per figure; benchmarks/README.md "
                                            "explains each.")
    add_sized_options(parser, full, quick, helps)
    add_task_options(parser)
    return parser


def apply_sizes(args: argparse.Namespace, full: dict, quick: dict) -> None:
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def add_task_options(parser: argparse.ArgumentParser) -> None:
    """The model and the problems it is trained on, and what every run shares."""
    parser.add_argument("--model", default="lab",
                        help="'lab' (the shipped lab model, lab problems) or a real model by name, e.g. "
                             "smollm2-135m-instruct (reasoning-gym problems; default: %(default)s)")
    parser.add_argument("--source", default="reasoning-gym:chain_sum", help="real model: the problems' data.source")
    parser.add_argument("--options", default='{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}',
                        help="real model: the generator's options, as JSON (default: %(default)s)")
    parser.add_argument("--answer-rule", default="last-number",
                        help="real model: data.answer_rule (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=64, help="teacher top-k support of the Phase 2 loss, 0 = full "
                                                              "vocabulary (default: %(default)s, as DistillConfig)")
    parser.add_argument("--lr", type=float, default=5e-6,
                        help="learning rate of every optimiser used here (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads, here and in every child (default: %(default)s); idle OpenMP "
                             "threads sleep (OMP_WAIT_POLICY=PASSIVE) unless OMP_WAIT_POLICY is set")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of problems, rollouts and random weights (default: %(default)s)")


# ----------------------------------------------------------------------------------------------------------
# Models and problems


@dataclass
class ModelSpec:
    """Enough to rebuild the same model in a child process."""

    kind: str  # "lab" (the shipped base model), "named" (a model by name) or "random" (a larger random lab model)
    name: str = "lab"  # kind "named": a name load_model takes (smollm2-135m-instruct, ...)
    hidden: int = 0
    layers: int = 0
    heads: int = 4
    max_positions: int = 2048
    vocab: int = 0  # 0: the lab tokenizer's vocabulary; larger: the embedding/LM head padded to this size
    seed: int = 0

    def describe(self) -> str:
        if self.kind == "lab":
            return "shipped lab base model"
        if self.kind == "named":
            return self.name
        vocab = f", vocabulary padded to {self.vocab}" if self.vocab else ""
        return (f"random lab-architecture model, hidden {self.hidden}, {self.layers} layers, "
                f"{self.heads} heads{vocab}")


def model_spec(args) -> ModelSpec:
    """The model --model names."""
    return ModelSpec("lab") if args.model == "lab" else ModelSpec("named", name=args.model)


def build(spec: ModelSpec):
    """The model and its tokenizer, on DEVICE, in eval mode."""
    from transformers import AutoTokenizer

    from sdzero.lab.model import PretrainConfig, build_model

    if spec.kind in ("lab", "named"):
        return load_model(spec.name, DEVICE)
    tokenizer = AutoTokenizer.from_pretrained(lab.BASE_MODEL_DIR)
    torch.manual_seed(spec.seed)
    cfg = PretrainConfig(hidden_size=spec.hidden, num_layers=spec.layers, num_heads=spec.heads,
                         intermediate_size=3 * spec.hidden, max_position_embeddings=spec.max_positions)
    model = build_model(tokenizer, cfg)
    if spec.vocab > model.config.vocab_size:
        # Unused extra rows, as in real models whose LM head is far wider than the lab's 320 tokens.
        model.resize_token_embeddings(spec.vocab, mean_resizing=False)
    return model.to(DEVICE).eval(), tokenizer


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def problems(args, n: int, seed: int) -> list[dict]:
    """`n` training problems for rollouts: lab problems, or the real model's reasoning-gym problems."""
    if args.model == "lab":
        return lab.problem_sets(0, n, 0, seed)[1]
    from sdzero.data import DataConfig, generated_problem_sets

    data = DataConfig(source=args.source, options=json.loads(args.options), answer_rule=args.answer_rule)
    return generated_problem_sets(data, "reasoning-gym", 0, n, 0, seed).n2


def reward_function(args) -> Callable:
    """(completion, row) -> reward of the problems `problems` gives."""
    return lab_reward if args.model == "lab" else task_reward("reasoning-gym")


# ----------------------------------------------------------------------------------------------------------
# Timing


def synchronize() -> None:
    """Wait for the GPU's queued work, so a clock read after it counts that work."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], object]], reps: int, warmup: int
                ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds (the process's, all its threads) of each timed run of every variant. The variants
    run in turn, A, B, A, B, ..., so a change in the machine's load hits all of them; the first `warmup`
    rounds are not kept. CPU time is what a step computes: other processes on a shared machine disturb it
    far less than the wall clock."""
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for rep in range(warmup + reps):
        for name, run in variants.items():
            synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            synchronize()
            if rep >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
    return wall, cpu


class ForwardClock:
    """Seconds spent inside the forward passes of some modules, read by torch forward hooks on them (the step
    itself runs unchanged): the process's CPU time on the CPU, wall time on CUDA (synchronised at each read)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.clock = time.perf_counter if DEVICE == "cuda" else time.process_time
        self.seconds = dict.fromkeys(modules, 0.0)
        self.handles = []
        for name, module in modules.items():
            self.handles += [module.register_forward_pre_hook(partial(self._enter, name)),
                             module.register_forward_hook(partial(self._leave, name))]

    def now(self) -> float:
        synchronize()
        return self.clock()

    def _enter(self, name, *_) -> None:
        self.started = self.now()

    def _leave(self, name, *_) -> None:
        self.seconds[name] += self.now() - self.started

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
