"""Long Phase 2 runs on the lab: does a 200-step run keep what it gained, and what drives a collapse?

For each seed, the demo's run directory RUNS/seed<S> (made by `sdzero demo` when missing) gives the SRT
model; every variant then trains Phase 2 from it for --steps steps with `sdzero distill` and evaluates
the saved model with `sdzero eval` (avg@8 on the 200 held-out problems). One line per finished run goes
to RUNS/results.jsonl, so a killed study resumes where it stopped, and the table is printed at the end:

    python benchmarks/phase2_long.py --runs runs/phase2_long --seeds 0 1 2 [--variants frozen gated ...]

`--model lab-v2 --set distill.teacher_max_length=1024` runs it on another lab model (the `--set`s go to
the demo and to every Phase 2 run); RUNS/seed<S> may also be an existing demo run of that model.

Columns: best tracked accuracy (avg@2 on 100 held-out problems) and its step, the tracked accuracy at
the last step (what the run would have ended with without keep-best), the saved model's avg@8, the
teacher refreshes, and the run's mean truncated / masked samples and cut rollouts per step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "frozen": [],                                                   # the lab defaults
    "gated": ["--set", "distill.refresh_margin=0.03"],              # gated teacher refresh
    "lr5e-6": ["--set", "distill.lr=5e-6"],                         # the official Phase 2 lr
    "mixed": ["--set", "distill.divergence=mixed"],                 # 0.5 forward + 0.5 reverse (official)
    "tail": ["--set", "distill.tail_bucket=true"],                  # reverse KL with a tail bucket
}
SDZERO = [sys.executable, "-m", "sdzero.cli"]


def run(command: list[str], log: Path) -> None:
    with log.open("a") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT)


def one_run(runs: Path, seed: int, variant: str, steps: int, model: str = "lab", sets: list[str] = ()) -> dict:
    base = runs / f"seed{seed}"
    overrides = [arg for item in sets for arg in ("--set", item)]
    if not (base / "srt" / "config.json").exists():
        run([*SDZERO, "demo", "--out", str(base), "--model", model, "--seed", str(seed), "--quiet", *overrides],
            runs / f"seed{seed}.log")
    out = runs / f"seed{seed}_{variant}"
    start = time.time()
    run([*SDZERO, "distill", "--out", str(out), "--model", str(base / "srt"), "--seed", str(seed),
         "--max-steps", str(steps), "--quiet", *overrides, *VARIANTS[variant]], runs / f"seed{seed}_{variant}.log")
    seconds = time.time() - start
    run([*SDZERO, "eval", "--model", str(out / "sdzero"), "--seed", str(seed), "--out", str(out / "eval"), "--quiet"],
        runs / f"seed{seed}_{variant}.log")
    metrics = [json.loads(line) for line in (out / "sdzero" / "metrics.jsonl").read_text().splitlines()]
    curve = [(m["step"], m["eval/accuracy"]) for m in metrics if "eval/accuracy" in m]
    steps_rows = [m for m in metrics if "loss" in m]
    best_step, best = max(curve, key=lambda point: (point[1], -point[0]))
    mean = lambda key: sum(m[key] for m in steps_rows) / len(steps_rows)  # noqa: E731
    report = json.loads((out / "eval" / "report.json").read_text())
    return {"seed": seed, "variant": variant, "steps": steps, "best_tracked": best, "best_step": best_step,
            "last_tracked": curve[-1][1], "saved_avg8": report["accuracy"], "saved_unfinished": report["unfinished"],
            "refreshes": sorted({m["sdzero/teacher_version"] for m in steps_rows})[-1],
            "truncated_per_step": mean("sdzero/truncated"), "masked_per_step": mean("sdzero/masked_out"),
            "unfinished_per_step": mean("sdzero/unfinished"),
            "teacher_gold_agreement": mean("sdzero/teacher_gold_agreement"), "curve": curve,
            "phase2_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/phase2_long"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--model", default="lab", help="base model of the demo runs (default: lab)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override for the demo and every Phase 2 run (repeatable)")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    results_path = args.runs / "results.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    # variant by variant, so the first seeds of every variant come before the last of any
    for variant in args.variants:
        for seed in args.seeds:
            if any(r["seed"] == seed and r["variant"] == variant and r["steps"] == args.steps for r in done):
                continue
            result = one_run(args.runs, seed, variant, args.steps, args.model, args.sets)
            done.append(result)
            with results_path.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    print("\n| variant | seed | best tracked (step) | last tracked | saved avg@8 | refreshes | truncated / masked "
          "per step | cut rollouts | teacher-gold agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in done:
        print(f"| {r['variant']} | {r['seed']} | {r['best_tracked']:.3f} ({r['best_step']}) | {r['last_tracked']:.3f} | "
              f"{r['saved_avg8']:.3f} | {r['refreshes']} | {r['truncated_per_step']:.1f} / {r['masked_per_step']:.1f} | "
              f"{r['unfinished_per_step']:.1%} | {r['teacher_gold_agreement']:.3f} |")


if __name__ == "__main__":
    main()
