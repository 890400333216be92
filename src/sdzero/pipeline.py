"""The whole method in one readable recipe: base -> Phase 1 collect -> SRT -> Phase 2 -> evaluation.

Every stage writes plain artifacts into the run directory:

    config.yaml                 the resolved configuration
    run.json                    the run's identity (seed, data, sets, phrases, base model), sdzero.rundir
    split.json                  the ids of N1, N2, the validation and the held-out problems
    */settings.json             the settings that made each stage's output
    phase1/attempts.jsonl       one line per N1 problem: first-answer rewards, revisions kept
    phase1/revisions.jsonl      the kept (x, y_init, P_r, y_revised) tuples, with token ids
    srt/                        the SRT model (save_pretrained) and its metrics.jsonl
    sdzero/                     the SD-Zero model (save_pretrained) and its metrics.jsonl
    eval/<model>.jsonl          every evaluation sample with its reward; eval/<model>.json its report
    srt/summary.json, sdzero/summary.json   written last: the stage is done (`run --resume` reuses it)
    report.json                 accuracies, lengths, counts, timings, and how the SD-Zero model was selected
    learning_curve.png          validation accuracy over Phase 2 steps

The stages and their set-up are sdzero.stages'; a whole run adds the held-out evaluation of each model, the
report and the learning curve.

Phase 2's learning curve, keep-best, the plateau rule and the gated refresh are measured on the validation
problems (training-side problems kept out of N1 and N2); the held-out set only gives the final figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sdzero.config import RunConfig, config_to_yaml
from sdzero.distill import teacher_context_limit
from sdzero.errors import Refusal
from sdzero.evaluate import evaluate, evaluate_revision
from sdzero.generation import make_generator
from sdzero.modeling import max_positions
from sdzero.rundir import RUN_OUTPUTS, differences, move_aside, stage_settings, stale_folder
from sdzero.stages import (Stages, begin_collect, curve_problems, load_run_model, open_stages, run_collect,
                           run_phase2, run_srt)
from sdzero.training import read_json, read_jsonl

# Imported from here by sdzero.evolve, sdzero.analysis, the tests and the benchmarks.
from sdzero.modeling import load_model  # noqa: F401
from sdzero.stages import curve_accuracy, problem_sets, save_stage, trainable  # noqa: F401


def selection(cfg: RunConfig, history: list[dict], best_step: int | None, keep_best: bool) -> str:
    """How a Phase 2 model was chosen, for report.json: the best point of the validation curve, or the last step."""
    if keep_best and best_step is not None and history:
        n_curve = min(cfg.eval.curve_problems, cfg.eval.n_validation())
        return (f"best of {len(history)} validation evaluations (avg@{cfg.eval.curve_k} on {n_curve} validation "
                f"problems): step {best_step}")
    return "last step"


def evaluation_settings(cfg: RunConfig, problems: list[dict]) -> dict:
    """What decides a stage's held-out evaluation: an earlier one is reused only under the same settings."""
    return stage_settings(k=cfg.eval.k, problems=[p["id"] for p in problems], sampling=cfg.sampling,
                          system_prompt=cfg.system_prompt,
                          revise={"problems": cfg.eval.revise_problems, "k": cfg.eval.revise_k,
                                  "feedback": cfg.eval.revise_feedback})


def run_pipeline(cfg: RunConfig, out_dir: str | Path, *, progress: bool = True, log=print, limit: int | None = None,
                 restart: bool = False, resume: bool = False) -> dict:
    """Run the whole method and write the run directory; returns report.json's content.

    `limit` is the --limit the sets were cut to (recorded, so the stage commands use the same sets);
    `restart`: a run directory made with other settings is moved aside instead of refused (sdzero.rundir);
    `resume`: continue a killed run, reusing every stage and evaluation it finished. Each stage starts from
    the run seed (and collection from a seed per chunk), so a resumed run ends as an uninterrupted one."""
    cfg.validate()
    teacher_context_limit(cfg.distill.teacher_max_length, max_positions(cfg.model))  # refused before any file
    out = Path(out_dir)
    stages = open_stages(cfg, out, limit=limit, restart=restart, log=log, progress=progress, resume=resume,
                         reuse_done=resume)
    start = time.time()
    sets = stages.load_sets()
    begin_collect(stages, {"N1": sets.n1, "N2": sets.n2, "validation": curve_problems(cfg, sets),
                           "held-out": sets.held_out})
    if not resume:
        # A re-run recomputes every stage but collection (which goes on with the problems not done yet): the
        # old results move aside first, so that no file of the run is left from the previous one.
        stale = stale_folder(out)
        moved = move_aside(out, ["srt", "sdzero", *RUN_OUTPUTS], stale)
        if moved:
            log(f"moved the previous {', '.join(moved)} to {stale}")
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    model = load_run_model(cfg)[0]
    generator = make_generator(model, stages.tokenizer, cfg.sampling)
    results: dict[str, dict] = {}

    def evaluated(name: str, trained) -> dict:
        generator.refresh(trained)
        results[name] = evaluate_stage(stages, generator, name)
        return results[name]

    stages.evaluate_model = evaluated
    results["base"] = evaluate_stage(stages, generator, "base")
    collection = run_collect(stages, generator)
    tuples = read_jsonl(out / "phase1" / "revisions.jsonl")
    if not tuples:
        log("Phase 1 kept no verified revision: nothing to train SRT on. Stopping here.")
        return _write_report(out, cfg, results, collection, {}, start)
    model, srt_summary = run_srt(stages, tuples, model)
    log(f"Phase 2: self-distillation on {len(sets.n2)} problems, {cfg.distill.max_steps} steps")
    model, distill_summary = run_phase2(stages, model, student=str(out / "srt"), generator=generator)
    report = _write_report(out, cfg, results, collection, {"srt": srt_summary, "distill": distill_summary}, start)
    if distill_summary["history"]:
        plot_learning_curve(out / "learning_curve.png", distill_summary, results, cfg)
    else:
        log("no learning_curve.png: Phase 2 tracked no validation accuracy (set distill.eval_every to draw one)")
    return report


def evaluate_stage(stages: Stages, generator, name: str) -> dict:
    """avg@k on the held-out problems of the model the generator samples from (and, with eval.revise_problems,
    generate-then-revise); eval/<name>.json. A resumed run reuses one made under the same settings."""
    cfg, out, held_out, log = stages.cfg, stages.out, stages.sets.held_out, stages.log
    path = out / "eval" / f"{name}.json"
    settings = evaluation_settings(cfg, held_out)
    if stages.resume and path.exists():
        earlier = read_json(path)
        found = differences(earlier.pop("settings", {}), settings)
        if not found:
            log(f"[{name}] avg@{cfg.eval.k} = {earlier['accuracy']:.3f} (evaluated before; reused)")
            return earlier
        log(f"[{name}] evaluated before with other settings ({'; '.join(found[:3])}); evaluating again")
    result = evaluate(generator, held_out, stages.verifier, k=cfg.eval.k, system_prompt=cfg.system_prompt,
                      samples_path=out / "eval" / f"{name}.jsonl", desc=f"evaluate {name}",
                      progress=stages.progress, seed=cfg.seed)
    log(f"[{name}] avg@{cfg.eval.k} = {result['accuracy']:.3f}  (mean length {result['mean_length']:.1f} tokens)")
    if cfg.eval.revise_problems:
        revise = result["revise"] = evaluate_revision(
            generator, held_out[:cfg.eval.revise_problems], stages.verifier, stages.phrases, k=cfg.eval.revise_k,
            feedback=cfg.eval.revise_feedback, system_prompt=cfg.system_prompt,
            samples_path=out / "eval" / f"{name}_revise.jsonl", desc=f"revise {name}", progress=stages.progress,
            seed=cfg.seed + 2)
        log(f"[{name}] generate-then-revise: {revise['initial_accuracy']:.3f} -> {revise['revised_accuracy']:.3f}, "
            f"correction rate {_pct(revise['correction_rate'])} of {revise['n_wrong']} wrong answers")
    # last: a killed evaluation is redone; the settings say when a resumed run may reuse it
    path.write_text(json.dumps({**result, "settings": settings}, indent=1))
    return result


def _write_report(out: Path, cfg: RunConfig, results: dict, collection: dict, training: dict, start: float) -> dict:
    distill_summary = training.get("distill", {})
    report = {
        "accuracy": {name: r["accuracy"] for name, r in results.items()},
        "mean_length": {name: r["mean_length"] for name, r in results.items()},
        "pass@k": {name: {key: v for key, v in r.items() if key.startswith("pass@")} for name, r in results.items()},
        "revise": {name: r["revise"] for name, r in results.items() if "revise" in r},
        "metric": f"avg@{cfg.eval.k}", "k": cfg.eval.k, "n_eval_problems": cfg.eval.n_problems,
        "seed": cfg.seed, "phase1": collection,
        "selection": selection(cfg, distill_summary.get("history", []), distill_summary.get("best_step"),
                               cfg.distill.keep_best) if distill_summary else None,
        "phase2_curve": distill_summary.get("history", []),
        "teacher_syncs": distill_summary.get("syncs", []),
        "wall_seconds": time.time() - start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def plot_learning_curve(path: Path, distill_summary: dict, results: dict, cfg: RunConfig) -> None:
    """Phase 2's tracked validation accuracy at each evaluated step (points joined by lines), with the stages'
    final held-out avg@k as horizontal references over the same steps. Needs at least one tracked evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = distill_summary["history"]
    if not history:
        raise Refusal("no learning curve to draw: Phase 2 tracked no evaluation (distill.eval_every is off)")
    n_curve = min(cfg.eval.curve_problems, cfg.eval.n_validation())  # the curve's are the first validation ones
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot([h["step"] for h in history], [h["accuracy"] for h in history], marker="o",
            label=f"student during Phase 2 (validation avg@{cfg.eval.curve_k}, {n_curve} problems)")
    for name, style in (("base", ":"), ("srt", "--"), ("sdzero", "-")):
        if name in results:
            ax.axhline(results[name]["accuracy"], linestyle=style, color="gray",
                       label=f"{name} (held-out avg@{cfg.eval.k}) = {results[name]['accuracy']:.3f}")
    for step in distill_summary.get("syncs", []):
        ax.axvline(step, color="tab:red", alpha=0.3)
    ax.set_xlabel("Phase 2 step")
    ax.set_ylabel("accuracy (curve: validation; lines: held-out)")
    ax.set_title(f"SD-Zero on {cfg.data.path or cfg.task}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
