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

Phase 2's learning curve, keep-best, the plateau rule and the gated refresh are measured on the validation
problems (training-side problems kept out of N1 and N2); the held-out set only gives the final figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sdzero.cards import evaluation_figures, run_card_fields, write_model_card
from sdzero.collect import collect
from sdzero.config import RunConfig, config_to_yaml
from sdzero.data import ProblemSets, load_problem_sets
from sdzero.distill import distill, teacher_context_limit
from sdzero.errors import Refusal
from sdzero.evaluate import evaluate, evaluate_revision
from sdzero.generation import make_generator
from sdzero.lab.diagnostics import gold_digit_tokens
from sdzero.modeling import is_lora, load_model, load_tokenizer, max_positions, merged_for_saving, prepare_for_training
from sdzero.prompts import check_prompt_room
from sdzero.rundir import (RUN_OUTPUTS, begin_stage, check_base_model, differences, model_fingerprint, move_aside,
                           open_run, phase1_settings, sdzero_settings, srt_settings, stage_settings, stale_folder)
from sdzero.srt import train_srt
from sdzero.training import (full_weights, is_fsdp2, is_main_process, read_json, read_jsonl, seed_everything,
                             wait_for_everyone)


def problem_sets(cfg: RunConfig, record_dir: str | Path | None = None, log=print) -> ProblemSets:
    """N1, N2, the validation and the held-out problems of the run: recorded in record_dir/split.json by the
    first command, checked against that record by every later one. Under `accelerate launch` the main process
    records."""
    main = is_main_process()

    def load() -> ProblemSets:
        return load_problem_sets(cfg.data, cfg.task, cfg.n_phase1, cfg.n_phase2, cfg.eval.n_problems, cfg.seed,
                                 record_dir=record_dir, n_validation=cfg.eval.n_validation())

    if main:
        sets = load()
    wait_for_everyone()
    if not main:
        return load()
    for part, skipped in sets.skipped.items():
        if skipped["count"]:
            log(f"skipped {skipped['count']} {part} rows without a usable gold answer: {skipped['reasons']} "
                f"(first: {', '.join(skipped['rows'])})")
    return sets


def curve_problems(cfg: RunConfig, sets: ProblemSets) -> list[dict]:
    """The problems of Phase 2's learning curve: the first eval.curve_problems validation problems. Keep-best,
    the plateau rule and the gated refresh act on this curve, so none of them sees a held-out problem."""
    return sets.validation[:cfg.eval.curve_problems]


def selection(cfg: RunConfig, history: list[dict], best_step: int | None, keep_best: bool) -> str:
    """How a Phase 2 model was chosen, for report.json: the best point of the validation curve, or the last step."""
    if keep_best and best_step is not None and history:
        n_curve = min(cfg.eval.curve_problems, cfg.eval.n_validation())
        return (f"best of {len(history)} validation evaluations (avg@{cfg.eval.curve_k} on {n_curve} validation "
                f"problems): step {best_step}")
    return "last step"


def curve_accuracy(cfg: RunConfig, generator, problems: list[dict], verifier):
    """Phase 2's `evaluate_fn`: avg@curve_k on `problems` of the weights the generator samples from
    (Phase 2 refreshes it with the student's after every step). Every point samples from the run seed on a
    random state of its own: the curve compares weights on the same draws, and tracking it leaves the
    rollouts Phase 2 trains on as they are."""
    def accuracy(student) -> float:
        return evaluate(generator, problems, verifier, k=cfg.eval.curve_k, system_prompt=cfg.system_prompt,
                        progress=False, seed=cfg.seed)["accuracy"]
    return accuracy


def evaluation_settings(cfg: RunConfig, problems: list[dict]) -> dict:
    """What decides a stage's held-out evaluation: an earlier one is reused only under the same settings."""
    return stage_settings(k=cfg.eval.k, problems=[p["id"] for p in problems], sampling=cfg.sampling,
                          system_prompt=cfg.system_prompt,
                          revise={"problems": cfg.eval.revise_problems, "k": cfg.eval.revise_k,
                                  "feedback": cfg.eval.revise_feedback})


def load_run_model(cfg: RunConfig, name: str | None = None):
    """The run's model (or `name`) in the run's dtype, and its tokenizer."""
    return load_model(name or cfg.model, dtype=cfg.dtype)


def trainable(model, cfg: RunConfig):
    """The model a training stage updates: gradient checkpointing and a fresh LoRA adapter when configured.

    A LoRA adapter from an earlier stage is merged first, so each stage's adapter starts from the
    previous stage's weights (and a Phase 2 teacher with the adapter switched off is the SRT model).
    """
    if is_lora(model):
        model = model.merge_and_unload()
    return prepare_for_training(model, gradient_checkpointing=cfg.gradient_checkpointing, lora=cfg.lora)


def save_stage(model, tokenizer, path: str | Path, cfg: RunConfig, stage: str, evaluation: dict | None = None) -> None:
    """A stage's model as a plain save_pretrained folder (loads in transformers or vLLM as it is;
    LoRA adapters are merged into the weights), with a README.md model card; `evaluation` is an
    `evaluate()` report of this model, when there is one. Under `accelerate launch` every process calls
    it (FSDP-sharded weights are gathered from all of them) and the main process writes."""
    state_dict = full_weights(model) if is_fsdp2(model) else None
    if is_main_process():
        merged_for_saving(model).save_pretrained(path, state_dict=state_dict)
        tokenizer.save_pretrained(path)
        write_model_card(path, base_model=cfg.model, stage=stage, **run_card_fields(cfg, stage),
                         evaluation=evaluation_figures(evaluation) if evaluation else None)
    wait_for_everyone()


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
    record = open_run(out, cfg, limit=limit, restart=restart, log=log)
    start = time.time()
    verifier = cfg.verifier()
    phrases = cfg.phrases()
    sets = problem_sets(cfg, record_dir=out, log=log)
    n1, n2, held_out, curve = sets.n1, sets.n2, sets.held_out, curve_problems(cfg, sets)
    check_prompt_room(load_tokenizer(cfg.model), {"N1": n1, "N2": n2, "validation": curve, "held-out": held_out},
                      cfg.system_prompt, max_positions(cfg.model))
    base_fingerprint = check_base_model(out, record, cfg, load_tokenizer(cfg.model))
    begin_stage(out, "phase1", phase1_settings(cfg, base_fingerprint), restart=restart, resume=True, log=log)
    if not resume:
        # A re-run recomputes every stage but collection (which goes on with the problems not done yet): the
        # old results move aside first, so that no file of the run is left from the previous one.
        stale = stale_folder(out)
        moved = move_aside(out, ["srt", "sdzero", *RUN_OUTPUTS], stale)
        if moved:
            log(f"moved the previous {', '.join(moved)} to {stale}")
    (out / "config.yaml").write_text(config_to_yaml(cfg))
    model, tokenizer = load_run_model(cfg)
    generator = make_generator(model, tokenizer, cfg.sampling)
    results: dict[str, dict] = {}

    def evaluate_stage(name: str) -> None:
        path = out / "eval" / f"{name}.json"
        settings = evaluation_settings(cfg, held_out)
        if resume and path.exists():
            earlier = read_json(path)
            found = differences(earlier.pop("settings", {}), settings)
            if not found:
                results[name] = earlier
                log(f"[{name}] avg@{cfg.eval.k} = {results[name]['accuracy']:.3f} (evaluated before; reused)")
                return
            log(f"[{name}] evaluated before with other settings ({'; '.join(found[:3])}); evaluating again")
        results[name] = evaluate(generator, held_out, verifier, k=cfg.eval.k, system_prompt=cfg.system_prompt,
                                 samples_path=out / "eval" / f"{name}.jsonl", desc=f"evaluate {name}",
                                 progress=progress, seed=cfg.seed)
        log(f"[{name}] avg@{cfg.eval.k} = {results[name]['accuracy']:.3f}  "
            f"(mean length {results[name]['mean_length']:.1f} tokens)")
        if cfg.eval.revise_problems:
            revise = results[name]["revise"] = evaluate_revision(
                generator, held_out[:cfg.eval.revise_problems], verifier, phrases, k=cfg.eval.revise_k,
                feedback=cfg.eval.revise_feedback, system_prompt=cfg.system_prompt,
                samples_path=out / "eval" / f"{name}_revise.jsonl", desc=f"revise {name}", progress=progress,
                seed=cfg.seed + 2)
            log(f"[{name}] generate-then-revise: {revise['initial_accuracy']:.3f} -> {revise['revised_accuracy']:.3f}, "
                f"correction rate {_pct(revise['correction_rate'])} of {revise['n_wrong']} wrong answers")
        # last: a killed evaluation is redone; the settings say when a resumed run may reuse it
        path.write_text(json.dumps({**results[name], "settings": settings}, indent=1))

    evaluate_stage("base")

    log(f"Phase 1: collecting revisions on {len(n1)} problems")
    collection = collect(generator, n1, verifier, phrases, out / "phase1", cfg.collect,
                         system_prompt=cfg.system_prompt, progress=progress, seed=cfg.seed)
    log(f"Phase 1: {collection['kept']} verified revisions kept "
        f"({collection['kept_after_wrong']} after a wrong answer, {collection['kept_after_right']} after a right one; "
        f"first-answer accuracy {collection['first_answer_accuracy']:.3f})")
    tuples = read_jsonl(out / "phase1" / "revisions.jsonl")
    if not tuples:
        log("Phase 1 kept no verified revision: nothing to train SRT on. Stopping here.")
        return _write_report(out, cfg, results, collection, {}, start)

    def train_stage(stage: str, settings: dict, train):
        """A training stage: reused when a resumed run finds it saved, else trained (from its checkpoint
        when resuming) and saved with its evaluation and summary."""
        nonlocal model
        begin_stage(out, stage, settings, resume=resume, log=log)
        if resume and (out / stage / "summary.json").exists():
            log(f"{stage}: trained before; loading {out / stage}")
            model = load_run_model(cfg, str(out / stage))[0]
            generator.refresh(model)
            evaluate_stage(stage)
            return read_json(out / stage / "summary.json")
        model = trainable(model, cfg)
        seed_everything(cfg.seed)
        summary = train(model)
        generator.refresh(model)
        evaluate_stage(stage)
        save_stage(model, tokenizer, out / stage, cfg, stage, results[stage])
        (out / stage / "summary.json").write_text(json.dumps(summary, indent=1))  # last: marks the stage done
        return summary

    srt_summary = train_stage(
        "srt", srt_settings(cfg, base_fingerprint, out / "phase1" / "revisions.jsonl"),
        lambda student: train_srt(student, tokenizer, tuples, phrases, cfg.srt, out_dir=out / "srt", seed=cfg.seed,
                                  system_prompt=cfg.system_prompt, progress=progress, resume=resume,
                                  log_config=cfg.log))
    log(f"Phase 2: self-distillation on {len(n2)} problems, {cfg.distill.max_steps} steps")
    distill_summary = train_stage(
        "sdzero", sdzero_settings(cfg, model_fingerprint(str(out / "srt")), "frozen copy of the student"),
        lambda student: distill(student, tokenizer, n2, verifier, phrases, cfg.sampling, cfg.distill,
                                out_dir=out / "sdzero", seed=cfg.seed,
                                evaluate_fn=curve_accuracy(cfg, generator, curve, verifier),
                                system_prompt=cfg.system_prompt, progress=progress, resume=resume,
                                log_config=cfg.log, generator=generator,
                                diagnostics=gold_digit_tokens if cfg.task == "lab" else None))
    report = _write_report(out, cfg, results, collection, {"srt": srt_summary, "distill": distill_summary}, start)
    if distill_summary["history"]:
        plot_learning_curve(out / "learning_curve.png", distill_summary, results, cfg)
    else:
        log("no learning_curve.png: Phase 2 tracked no validation accuracy (set distill.eval_every to draw one)")
    return report


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
