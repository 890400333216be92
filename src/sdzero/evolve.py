"""Self-evolution: does synchronising the teacher with the student keep Phase 2 improving?

With a frozen teacher, Phase 2 can at best make the generator as good as the SRT reviser, so the
gain plateaus. Setting teacher <- student lets a better generator become a better reviser, whose
signal is distilled in turn. `self_evolution` tests this on the lab task: starting from the same
SRT model with the same seed (so both runs are identical up to the first sync), it trains Phase 2
once with a frozen teacher and once with teacher sync, tracks validation accuracy along the way (the plateau
rule and keep-best act on it), evaluates both resulting students with avg@k on the held-out set, and writes

    evolve/frozen/, evolve/synced/    metrics.jsonl of each run and its evaluation samples
    evolve/report.json                both curves, the sync steps, final avg@k and lengths, and the selection
    evolve/self_evolution.png         accuracy over Phase 2 steps, sync points marked
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

from sdzero.config import RunConfig
from sdzero.distill import distill
from sdzero.evaluate import evaluate
from sdzero.generation import make_generator
from sdzero.lab.diagnostics import gold_digit_tokens
from sdzero.pipeline import (curve_accuracy, curve_problems, load_run_model, problem_sets, run_pipeline, selection,
                             trainable)
from sdzero.rundir import open_run
from sdzero.training import seed_everything


def self_evolution(cfg: RunConfig, run_dir: str | Path, *, progress: bool = True, log=print,
                   limit: int | None = None) -> dict:
    """Frozen vs synced Phase 2 from run_dir/srt (the whole pipeline is run first when it is missing);
    a run directory of other settings is refused (sdzero.rundir)."""
    cfg.validate()
    run_dir = Path(run_dir)
    if not (run_dir / "srt" / "config.json").exists():
        log(f"no SRT model in {run_dir}: running the pipeline first")
        run_pipeline(cfg, run_dir, progress=progress, log=log, limit=limit)
    open_run(run_dir, cfg, log=log)
    verifier = cfg.verifier()
    sets = problem_sets(cfg, record_dir=run_dir, log=log)
    n2, held_out, curve = sets.n2, sets.held_out, curve_problems(cfg, sets)
    e = cfg.evolve
    runs = {"frozen": replace(cfg.distill, max_steps=e.max_steps, eval_every=e.eval_every, sync_every=None,
                              sync_patience=None),
            "synced": replace(cfg.distill, max_steps=e.max_steps, eval_every=e.eval_every, sync_every=e.sync_every,
                              sync_patience=e.sync_patience)}
    report = {"seed": cfg.seed, "metric": f"avg@{cfg.eval.k}", "curve_metric": f"avg@{cfg.eval.curve_k}",
              "curve_problems": len(curve), "evolve": asdict(e), "runs": {}}
    for name, distill_cfg in runs.items():
        model, tokenizer = load_run_model(cfg, str(run_dir / "srt"))
        seed_everything(cfg.seed)
        model = trainable(model, cfg)
        generator = make_generator(model, tokenizer, cfg.sampling)

        log(f"self-evolution: Phase 2 with a {name} teacher, {e.max_steps} steps")
        summary = distill(model, tokenizer, n2, verifier, cfg.phrases(), cfg.sampling, distill_cfg,
                          out_dir=run_dir / "evolve" / name, seed=cfg.seed,
                          evaluate_fn=curve_accuracy(cfg, generator, curve, verifier),
                          system_prompt=cfg.system_prompt, progress=progress, log_config=cfg.log,
                          generator=generator, diagnostics=gold_digit_tokens if cfg.task == "lab" else None)
        generator.refresh(model)
        final = evaluate(generator, held_out, verifier, k=cfg.eval.k, system_prompt=cfg.system_prompt,
                         samples_path=run_dir / "evolve" / name / "eval.jsonl", desc=f"evaluate {name}",
                         progress=progress)
        report["runs"][name] = {"accuracy": final["accuracy"], "mean_length": final["mean_length"],
                                "history": summary["history"], "syncs": summary["syncs"],
                                "selection": selection(cfg, summary["history"], summary["best_step"],
                                                       distill_cfg.keep_best)}
        log(f"[{name}] avg@{cfg.eval.k} = {final['accuracy']:.3f} after {e.max_steps} steps, "
            f"teacher synced at steps {summary['syncs'] or 'none'}")
    report["gain"] = report["runs"]["synced"]["accuracy"] - report["runs"]["frozen"]["accuracy"]
    (run_dir / "evolve" / "report.json").write_text(json.dumps(report, indent=2))
    plot_self_evolution(run_dir / "evolve" / "self_evolution.png", report)
    return report


def plot_self_evolution(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    # the runs coincide up to the first sync: the frozen one is drawn dashed with hollow markers on top
    styles = {"frozen": dict(color="tab:gray", linestyle="--", marker="s", markerfacecolor="none", zorder=3),
              "synced": dict(color="tab:red", linestyle="-", marker="o", zorder=2)}
    for name, run in report["runs"].items():
        history = run["history"]
        colour = styles[name]["color"]
        ax.plot([h["step"] for h in history], [h["accuracy"] for h in history], **styles[name],
                label=f"{name} teacher (final {report['metric']} = {run['accuracy']:.3f})")
        for i, step in enumerate(run["syncs"]):
            ax.axvline(step, color=colour, linestyle="--", alpha=0.5, label="teacher sync" if i == 0 else None)
    ax.set_xlabel("Phase 2 step")
    ax.set_ylabel(f"validation accuracy ({report['curve_metric']}, {report['curve_problems']} problems)")
    ax.set_title(f"Self-evolution: frozen vs synced teacher (seed {report['seed']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
