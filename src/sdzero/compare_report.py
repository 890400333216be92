"""`sdzero compare`'s report: per method the seed means and spreads of accuracy and of what it spent, its
seed-mean learning curve, the generations (and wall time) it took to reach GRPO's final curve accuracy, and
generate-then-revise of the base, SRT and SD-Zero models; as report.json, a markdown table (report.md) and
the curves (sample_efficiency.png)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from sdzero.config import RunConfig


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_curve(rows: list[dict], base_rows: dict) -> list[dict]:
    """Per method, the seed-mean curve: point i averaged over the seeds (base at 0 generations first)."""
    curves = []
    for row in rows:
        base = base_rows.get(row["seed"])
        points = ([{"generations": 0, "wall_seconds": 0.0, "accuracy": base["summary"]["curve"][0]["accuracy"]}]
                  if base else [])
        curves.append(points + row["summary"]["curve"])
    n = min(map(len, curves))
    out = []
    for i in range(n):
        gens, accs = [c[i]["generations"] for c in curves], [c[i]["accuracy"] for c in curves]
        mean, std = _mean_std(accs)
        walls = [c[i].get("wall_seconds") for c in curves]
        out.append({"generations": statistics.fmean(gens), "accuracy_mean": mean, "accuracy_std": std,
                    # results recorded before curve points carried their wall time have none
                    "wall_seconds": statistics.fmean(walls) if None not in walls else None})
    return out


def first_point_at(curve: list[dict], level: float) -> dict | None:
    """The first measured point of the mean curve at or above `level`; None if none is.

    No interpolation: between two measured points a method may have no model at all (SD-Zero has
    none before SRT ends), so only measured points count.
    """
    return next((point for point in curve if point["accuracy_mean"] >= level), None)


def write_report(out: Path, cfg: RunConfig, ccfg, names: list[str], rows: list[dict]) -> dict:
    """report.json, report.md and sample_efficiency.png of the result rows so far: the methods `names` (in order)
    against the base model, per seed and as seed means; `ccfg`: compare's settings (sdzero.compare)."""
    base_rows = {r["seed"]: r for r in rows if r["method"] == "base"}
    base_mean, base_std = _mean_std([r["accuracy"] for r in base_rows.values()])
    methods = {}
    for name in names:
        mrows = sorted((r for r in rows if r["method"] == name), key=lambda r: r["seed"])
        if not mrows:
            continue
        mean, std = _mean_std([r["accuracy"] for r in mrows])
        entry = {"accuracy": mean, "accuracy_std": std, "seeds": [r["seed"] for r in mrows],
                 "accuracy_per_seed": [r["accuracy"] for r in mrows]}
        for key in ("questions", "generations", "sampled_tokens", "trained_tokens", "wall_seconds", "mean_length"):
            entry[key] = statistics.fmean(r[key] for r in mrows)
            entry[f"{key}_per_seed"] = [r[key] for r in mrows]
        entry["target_generations_per_seed"] = [r["target_generations"] for r in mrows]
        gaps = [r["budget_gap"] for r in mrows if r.get("budget_gap") is not None]
        entry["max_budget_gap"] = max(gaps) if gaps else None
        entry["curve"] = mean_curve(mrows, base_rows)
        settings = mrows[0]["summary"].get("settings")
        if settings:
            entry["settings"] = settings
        methods[name] = entry
    if "grpo" in methods and methods["grpo"]["curve"]:
        level = methods["grpo"]["curve"][-1]["accuracy_mean"]
        for entry in methods.values():
            reached = first_point_at(entry["curve"], level)
            entry["generations_to_reach_grpo_final"] = None if reached is None else reached["generations"]
            entry["wall_seconds_to_reach_grpo_final"] = None if reached is None else reached["wall_seconds"]
    report = {
        "base": {"accuracy": base_mean, "accuracy_std": base_std,
                 "accuracy_per_seed": [base_rows[s]["accuracy"] for s in sorted(base_rows)],
                 "mean_length": statistics.fmean(r["mean_length"] for r in base_rows.values()) if base_rows else None},
        "methods": methods,
        "metric": f"avg@{cfg.eval.k}", "k": cfg.eval.k, "n_eval_problems": cfg.eval.n_problems,
        "seeds": sorted({r["seed"] for r in rows}),
        "curve_metric": f"avg@{cfg.eval.curve_k} on the first {cfg.eval.curve_problems} validation problems",
        "selection": selection_text(cfg, ccfg),
        "budget": {"target": ccfg.budget if ccfg.budget is not None else "SD-Zero's actual generations per seed",
                   "tolerance": ccfg.tolerance},
        "grpo_final_curve_accuracy": methods["grpo"]["curve"][-1]["accuracy_mean"] if "grpo" in methods else None,
        "revise": revise_rows(rows),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_table(report))
    plot_curves(out / "sample_efficiency.png", report)
    return report


def revise_rows(rows: list[dict]) -> list[dict]:
    """Generate-then-revise of the base, SRT and SD-Zero models, one entry per (model, seed) measured."""
    out = []
    for row in sorted(rows, key=lambda r: r["seed"]):
        measured = {"base": row.get("revise")} if row["method"] == "base" else \
            {"srt": row["summary"].get("srt_revise"), "sdzero": row.get("revise")} if row["method"] == "sdzero" else {}
        out += [{"model": name, "seed": row["seed"], **result} for name, result in measured.items() if result]
    order = ["base", "srt", "sdzero"]
    return sorted(out, key=lambda r: (order.index(r["model"]), r["seed"]))


def selection_text(cfg: RunConfig, ccfg) -> str:
    """How the model of each method evaluated on the held-out set was chosen, in the report's words."""
    if ccfg.selection == "none":
        return "none: each method's final model"
    n_curve = min(cfg.eval.curve_problems, cfg.eval.n_validation())
    return (f"validation: each method's model at its best validation curve point (avg@{cfg.eval.curve_k} on "
            f"{n_curve} validation problems, the same for every method)")


def markdown_table(report: dict) -> str:
    k = report["k"]
    lines = [f"| method | avg@{k} (mean ± std) | length | generations | sampled tokens | trained tokens | wall (s) | "
             f"generations to reach GRPO's final | wall (s) to reach it |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = report["base"]
    base_length = "" if base.get("mean_length") is None else f"{base['mean_length']:.1f}"
    lines.append(f"| base | {base['accuracy']:.3f} ± {base['accuracy_std']:.3f} | {base_length} | 0 | 0 | 0 | 0 | | |")
    for name, m in report["methods"].items():
        reach = [m.get(f"{what}_to_reach_grpo_final") for what in ("generations", "wall_seconds")]
        if "generations_to_reach_grpo_final" not in m:  # no GRPO in this comparison
            reach_text = ["", ""]
        elif reach[0] is None:
            reach_text = ["not reached", ""]
        else:
            reach_text = [f"{value:.0f}" if value is not None else "not recorded" for value in reach]
        lines.append(f"| {name} | {m['accuracy']:.3f} ± {m['accuracy_std']:.3f} | {m['mean_length']:.1f} | "
                     f"{m['generations']:.0f} | "
                     f"{m['sampled_tokens']:.0f} | {m['trained_tokens']:.0f} | {m['wall_seconds']:.0f} | "
                     f"{reach_text[0]} | {reach_text[1]} |")
    seeds = ", ".join(map(str, report["seeds"]))
    lines.append("")
    lines.append(f"{report['metric']} on {report['n_eval_problems']} held-out problems; seeds {seeds}; "
                 f"curves: {report['curve_metric']}; selection: {report.get('selection', 'none')}.")
    if report.get("revise"):
        lines += ["", "Generate-then-revise (first answer, then one revision after the reward's phrase):", "",
                  "| model | seed | answers | first | revised | correction | spoil | length first -> revised |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["revise"]:
            rates = [("" if r[key] is None else f"{r[key]:.1%}") for key in ("correction_rate", "spoil_rate")]
            lines.append(f"| {r['model']} | {r['seed']} | {r['n_answers']} | {r['initial_accuracy']:.3f} | "
                         f"{r['revised_accuracy']:.3f} | {rates[0]} of {r['n_wrong']} | {rates[1]} | "
                         f"{r['initial_length']:.1f} -> {r['revised_length']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_curves(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    for name, m in report["methods"].items():
        curve = m["curve"]
        if not curve:
            continue
        x = [p["generations"] for p in curve]
        y = [p["accuracy_mean"] for p in curve]
        s = [0.0 if math.isnan(p["accuracy_std"]) else p["accuracy_std"] for p in curve]
        line, = ax.plot(x, y, marker="o", label=name)
        ax.fill_between(x, [a - b for a, b in zip(y, s)], [a + b for a, b in zip(y, s)], color=line.get_color(),
                        alpha=0.15)
    if report.get("grpo_final_curve_accuracy") is not None:
        ax.axhline(report["grpo_final_curve_accuracy"], linestyle=":", color="gray", label="GRPO final")
    ax.set_xlabel("generations sampled")
    ax.set_ylabel(f"validation accuracy ({report['curve_metric'].split(' on ')[0]})")
    ax.set_title(f"Sample efficiency (mean ± std over {len(report['seeds'])} seed(s))")
    if ax.get_legend_handles_labels()[0]:  # nothing to label before the first method has finished
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
