"""The issue-13 tables: lab models side by side over seeds, from run directories on disk.

`benchmarks/lab_study.sh MODEL SEED RUNS` writes, for one lab model and seed,
    RUNS/MODEL_sSEED                 `sdzero demo` (base, SRT, SD-Zero, generate-then-revise)
    RUNS/MODEL_sSEED/inspect_srt     `sdzero inspect`, SRT student and teacher
    RUNS/MODEL_sSEED/inspect_sdzero  `sdzero inspect`, SD-Zero student, SRT teacher
    RUNS/MODEL_nop1_sSEED            Phase 2 from the base model, without Phase 1, and its evaluation
and this script reads them (whatever is there so far) and prints markdown tables: accuracy and the
Phase 2 gains, generate-then-revise, localisation ranked by both per-token measures (recomputed
from each inspect's signals.jsonl), and SRT's answers by control phrase. A missing run shows as "-".

    .venv/bin/python benchmarks/lab_study.py RUNS [--models lab-v2 lab-control] [--seeds 0 1 2] [--summary]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sdzero.analysis import MEASURES, TokenSignal, lab_problem, localization
from sdzero.lab.task import reward
from sdzero.prompts import ControlPhrases


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def runs(root: Path, model: str, seed: int) -> dict:
    """What one (model, seed) left on disk."""
    report = read_json(root / f"{model}_s{seed}" / "report.json") or {}
    nop1 = read_json(root / f"{model}_nop1_s{seed}" / "eval_sdzero" / "report.json")
    acc = report.get("accuracy", {})
    gain_after_srt = acc["sdzero"] - acc["srt"] if {"sdzero", "srt"} <= set(acc) else None
    gain_without = nop1["accuracy"] - acc["base"] if nop1 and "base" in acc else None
    return {"base": acc.get("base"), "srt": acc.get("srt"), "sdzero": acc.get("sdzero"),
            "nop1": nop1["accuracy"] if nop1 else None, "gain_after_srt": gain_after_srt,
            "gain_without_phase1": gain_without, "revise": report.get("revise", {})}


def run_phrases(run: Path) -> ControlPhrases:
    """The control phrases a run directory recorded in its run.json."""
    identity = (read_json(run / "run.json") or {}).get("identity", {})
    return ControlPhrases(**identity.get("control_phrases", {}))


def located(inspect_dir: Path) -> dict | None:
    """localization() by both measures, recomputed from an inspect folder's signals.jsonl."""
    path = inspect_dir / "signals.jsonl"
    if not path.exists():
        return None
    phrases = run_phrases(inspect_dir.parent)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    signals = [TokenSignal(**{k: v for k, v in row.items() if k not in ("id", "first_wrong_step")}) for row in rows]
    problems = [lab_problem({"id": row["id"]}) for row in rows]
    return {measure: localization(signals, problems, phrases, measure) for measure in MEASURES}


def accuracy_table(root, model, seeds):
    print(f"\n### {model}: avg@8, and what Phase 2 gains\n")
    print("| seed | base | SRT | SD-Zero | Phase 2 without Phase 1 | gain after SRT | gain without Phase 1 |")
    print("|---|---|---|---|---|---|---|")
    keys = ["base", "srt", "sdzero", "nop1", "gain_after_srt", "gain_without_phase1"]
    rows = [runs(root, model, s) for s in seeds]
    for seed, row in zip(seeds, rows):
        print(f"| {seed} | " + " | ".join(fmt(row[k]) for k in keys) + " |")
    print("| mean | " + " | ".join(fmt(mean([r[k] for r in rows])) for k in keys) + " |")


def revise_table(root, model, seeds):
    print(f"\n### {model}: generate-then-revise (initial -> revised, correction of wrong, spoil of right)\n")
    print("| stage | " + " | ".join(f"seed {s}" for s in seeds) + " | mean correction | mean spoil |")
    print("|---|" + "---|" * (len(seeds) + 2))
    rows = [runs(root, model, s)["revise"] for s in seeds]
    for stage in ("base", "srt", "sdzero"):
        cells = []
        for rev in rows:
            r = rev.get(stage)
            cells.append("-" if r is None else f"{r['initial_accuracy']:.2f} -> {r['revised_accuracy']:.2f}, "
                         f"{fmt(r['correction_rate'], '.1%')} of {r['n_wrong']}, {fmt(r['spoil_rate'], '.1%')}")
        corr = mean([rev[stage]["correction_rate"] for rev in rows if stage in rev])
        spoil = mean([rev[stage]["spoil_rate"] for rev in rows if stage in rev])
        print(f"| {stage} | " + " | ".join(cells) + f" | {fmt(corr, '.1%')} | {fmt(spoil, '.1%')} |")


def localization_table(root, model, seeds):
    print(f"\n### {model}: localisation (top token in the first wrong step vs chance; mean wrong / right)\n")
    print("| pair | measure | answers | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ratio |")
    print("|---|---|---|" + "---|" * (len(seeds) + 1))
    for pair, folder in (("SRT/SRT", "inspect_srt"), ("SD-Zero/SRT", "inspect_sdzero")):
        found = [located(root / f"{model}_s{s}" / folder) for s in seeds]
        for measure in MEASURES:
            for answers in ("all", "single_attempt"):
                cells, ratios = [], []
                for loc in found:
                    part = None if loc is None else (loc[measure] if answers == "all" else loc[measure][answers])
                    if part is None:
                        cells.append("-")
                        continue
                    w = part["wrong"]
                    ratios.append(w["ratio"])
                    cells.append(f"{fmt(w['top_kl_in_first_wrong_step'], '.1%')} vs {fmt(w['chance'], '.1%')} "
                                 f"(x{fmt(w['ratio'], '.2f')}); {fmt(w['kl_mean'], '.3f')} / "
                                 f"{fmt(part['right']['kl_mean'], '.3f')}")
                print(f"| {pair} | {measure} | {answers.replace('_', '-')} | " + " | ".join(cells)
                      + f" | {fmt(mean(ratios), '.2f')} |")


def srt_answers_table(root, model, seeds):
    """SRT's sampled answers (its avg@8 evaluation) by the control phrase they hold: how often each, and how
    often the first attempt and the final answer are right. Separates a better first attempt from a
    better revision."""
    print(f"\n### {model}: SRT's answers by control phrase (share; first attempt right -> final right)\n")
    print("| seed | one attempt | \"start over\" | \"rephrase\" | first attempt right, all answers |")
    print("|---|---|---|---|---|")
    for seed in seeds:
        run = root / f"{model}_s{seed}"
        path = run / "eval" / "srt.jsonl"
        if not path.exists():
            continue
        phrases = run_phrases(run)
        groups = {"one": [], "wrong": [], "correct": []}
        for row in map(json.loads, path.read_text().splitlines()):
            problem = lab_problem(row)
            first = row["response"].split("\n\n")[0]
            kind = next((k for k in ("wrong", "correct") if getattr(phrases, k) in row["response"]), "one")
            groups[kind].append((reward(first, problem), float(row["reward"])))
        total = sum(map(len, groups.values()))
        cells = [f"{len(g) / total:.2f}; {mean([a for a, _ in g]) or 0:.2f} -> {mean([b for _, b in g]) or 0:.2f}"
                 for g in groups.values()]
        first_right = mean([a for g in groups.values() for a, _ in g])
        print(f"| {seed} | " + " | ".join(cells) + f" | {first_right:.3f} |")


def summary_table(root, models, seeds):
    """One row per model and seed (and the model's mean): the README's table."""
    print("| model | seed | base | SRT | SD-Zero | Phase 2 without Phase 1 | base: correction | SRT: initial -> "
          "revised, correction | top token KL reward in the first wrong step, x chance (SRT/SRT) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in models:
        rows = []
        for seed in seeds:
            row = runs(root, model, seed)
            loc = located(root / f"{model}_s{seed}" / "inspect_srt")
            rev = row["revise"]
            rows.append({**row, "base_corr": rev["base"]["correction_rate"] if "base" in rev else None,
                         "srt_init": rev["srt"]["initial_accuracy"] if "srt" in rev else None,
                         "srt_rev": rev["srt"]["revised_accuracy"] if "srt" in rev else None,
                         "srt_corr": rev["srt"]["correction_rate"] if "srt" in rev else None,
                         "ratio": loc["token_kl_reward"]["wrong"]["ratio"] if loc else None})
        for seed, r in [*zip(seeds, rows), ("mean", {k: mean([r[k] for r in rows]) for k in rows[0] if k != "revise"})]:
            print(f"| `{model}` | {seed} | {fmt(r['base'])} | {fmt(r['srt'])} | {fmt(r['sdzero'])} | {fmt(r['nop1'])} | "
                  f"{fmt(r['base_corr'], '.1%')} | {fmt(r['srt_init'], '.2f')} -> {fmt(r['srt_rev'], '.2f')}, "
                  f"{fmt(r['srt_corr'], '.1%')} | {fmt(r['ratio'], '.2f')} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path)
    parser.add_argument("--models", nargs="+", default=["lab-v2", "lab-control"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--summary", action="store_true", help="only the README's one-table summary")
    args = parser.parse_args()
    if args.summary:
        summary_table(args.runs, args.models, args.seeds)
        return
    for model in args.models:
        accuracy_table(args.runs, model, args.seeds)
        revise_table(args.runs, model, args.seeds)
        localization_table(args.runs, model, args.seeds)
        srt_answers_table(args.runs, model, args.seeds)


if __name__ == "__main__":
    main()
