"""One short check of the GPU paths, for a machine with a CUDA GPU: bf16 Phase 2 steps, an evaluation,
and the vLLM backend (engine start, greedy agreement with transformers, the weight push after training).

    python benchmarks/gpu_check.py                       # defaults: a couple of minutes on one GPU
    python benchmarks/gpu_check.py --steps 2 --prompts 4 --max-new-tokens 40 --eval-problems 4 --k 1

Without CUDA it runs the same on the CPU in float32 and says so (vLLM is then skipped). Output is one
`name: value` line per figure. Last, where vLLM is installed, it runs the vLLM backend's tests
(tests/with_vllm, what `make test-vllm` runs against vLLM's CPU build) on this machine: `vllm_tests`. Before
that, `fsdp_tests`: tests/test_fsdp.py, SRT and Phase 2 sharded with FSDP2 over two gloo processes (on the CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdzero import lab
from sdzero.distill import DistillConfig, distill
from sdzero.evaluate import evaluate
from sdzero.generation import Generator, SamplingConfig, VLLMGenerator, vllm_importable
from sdzero.pipeline import load_model
from sdzero.prompts import ControlPhrases, generator_prompt_ids
from sdzero.tasks.lab import lab_reward


def report(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4g}"
    print(f"{name}: {value}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="Phase 2 steps (the first is a warm-up)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per Phase 2 step")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--lr", type=float, default=1e-4, help="high enough that bf16 weights visibly move")
    parser.add_argument("--eval-problems", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="samples per evaluation problem")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def greedy_ids(generator, prompts: list[list[int]]) -> list[list[int]]:
    return [per_prompt[0].ids for per_prompt in generator.sample(prompts, 1, progress=False)]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def engine_embedding(generator: VLLMGenerator) -> torch.Tensor:
    """vLLM's copy of the token embedding (same name in the checkpoint and in vLLM's Qwen2 model)."""
    [weight] = generator.llm.apply_model(
        lambda m: dict(m.named_parameters())["model.embed_tokens.weight"].detach().float().cpu())
    return weight


def pytest_summary(path: str) -> str:
    """pytest's summary line for tests/`path`, run in a process of its own (vLLM test files start engines, the
    FSDP test starts two processes)."""
    tests = Path(__file__).resolve().parents[1] / "tests" / path
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                          capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}: {done.stderr.strip()[-300:]}"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        device = "cuda"
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        report("device", torch.cuda.get_device_name())
    else:
        device, dtype = "cpu", torch.float32
        report("device", "cpu (no CUDA available: falling back to the CPU in float32, vLLM skipped)")
    report("dtype", str(dtype).removeprefix("torch."))
    report("torch_version", torch.__version__)
    for name, value in vars(args).items():
        report(f"setting_{name}", value)

    model, tokenizer = load_model("lab", device)
    model.to(dtype)
    _, train_rows, held_out = lab.problem_sets(0, args.prompts * args.steps, args.eval_problems, args.seed)
    held_out_prompts = [generator_prompt_ids(tokenizer, row["problem"]) for row in held_out]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=args.max_new_tokens, batch_size=args.eval_problems)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens, batch_size=args.prompts)

    # The engine starts from the untrained weights, as it would at the start of Phase 2.
    vllm_generator, vllm_reason = None, ""
    if device != "cuda":
        vllm_reason = "no CUDA"
    elif not vllm_importable():
        vllm_reason = "vllm not installed (pip install 'sdzero[vllm]')"
    else:
        import vllm

        report("vllm_version", vllm.__version__)
        try:
            start = time.perf_counter()
            vllm_generator = VLLMGenerator(model, tokenizer, greedy)
            report("vllm_engine_start_s", time.perf_counter() - start)
            report("vllm_greedy_agreement_untrained", agreement(greedy_ids(vllm_generator, held_out_prompts),
                                                                greedy_ids(Generator(model, tokenizer, greedy),
                                                                           held_out_prompts)))
        except Exception as err:  # report, then go on with the transformers checks
            vllm_reason = f"engine failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]

    # Phase 2 steps with the real trainer; per-step times come from its own metrics clock.
    cfg = DistillConfig(prompts_per_step=args.prompts, micro_batch_size=args.prompts, max_steps=args.steps,
                        lr=args.lr, warmup_steps=0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        distill(model, tokenizer, train_rows, lab_reward, ControlPhrases(), sampling, cfg, out_dir=out,
                seed=args.seed, progress=False)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    ends = [r["seconds"] for r in records]
    step_s = [b - a for a, b in zip([0.0] + ends, ends)]
    report("phase2_step_s", statistics.median(step_s[1:]) if len(step_s) > 1 else step_s[0])
    report("phase2_step_s_all", " ".join(f"{s:.2f}" for s in step_s))
    report("phase2_reward_last_step", records[-1]["sdzero/reward"])
    report("phase2_kl_last_step", records[-1]["sdzero/kl"])
    if device == "cuda":
        report("phase2_peak_gpu_memory_gib", torch.cuda.max_memory_allocated() / 2**30)

    start = time.perf_counter()
    result = evaluate(Generator(model, tokenizer, sampling), held_out, lab_reward, k=args.k, progress=False)
    synchronize(device)
    report("eval_transformers_s", time.perf_counter() - start)
    report("eval_transformers_accuracy", result["accuracy"])
    report("eval_transformers_mean_length", result["mean_length"])

    report("fsdp_tests", pytest_summary("test_fsdp.py"))
    if vllm_importable():
        report("vllm_tests", pytest_summary("with_vllm"))
    if vllm_generator is None:
        report("vllm", f"skipped ({vllm_reason})")
        return
    try:
        trained = greedy_ids(Generator(model, tokenizer, greedy), held_out_prompts)
        hf_embedding = model.get_input_embeddings().weight.detach().float().cpu()
        report("vllm_embedding_max_diff_before_refresh", (engine_embedding(vllm_generator) - hf_embedding).abs().max().item())
        report("vllm_greedy_agreement_before_refresh", agreement(greedy_ids(vllm_generator, held_out_prompts), trained))
        start = time.perf_counter()
        vllm_generator.refresh(model)
        synchronize(device)
        report("vllm_refresh_s", time.perf_counter() - start)
        report("vllm_embedding_max_diff_after_refresh", (engine_embedding(vllm_generator) - hf_embedding).abs().max().item())
        report("vllm_greedy_agreement_after_refresh", agreement(greedy_ids(vllm_generator, held_out_prompts), trained))
        vllm_generator.sampling = sampling
        start = time.perf_counter()
        result = evaluate(vllm_generator, held_out, lab_reward, k=args.k, progress=False)
        report("eval_vllm_s", time.perf_counter() - start)
        report("eval_vllm_accuracy", result["accuracy"])
        report("eval_vllm_mean_length", result["mean_length"])
        report("vllm", "ok")
    except Exception as err:
        report("vllm", f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"[:300])


if __name__ == "__main__":
    sys.exit(main())
