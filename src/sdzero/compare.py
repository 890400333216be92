"""`sdzero compare`: SD-Zero against RFT, GRPO and SDFT from the same base model, on the same
questions, at a matched sample budget, evaluated with the same avg@k on the same held-out problems.

Budget matching (per seed), counted in generations (sampled responses):
  * SD-Zero spends N1 x answers x (1 + revisions) in Phase 1 (every first answer is revised when
    collect.revise_correct, the paper's choice) plus Phase 2 steps x prompts_per_step rollouts.
  * The target T is `compare.budget` when set (then SD-Zero's Phase 2 steps are chosen, after Phase 1,
    so that its total comes closest to T), otherwise SD-Zero's actual count in that seed (or, without
    SD-Zero in the run, the count its configuration implies).
  * Each baseline samples G per question on the first q questions of N1 + N2 (the same question pool
    SD-Zero draws from, in the seed's order): q = round(T / G) for RFT; for the TRL methods q is
    rounded to whole optimiser steps of prompts_per_step questions. A run whose actual generations
    differ from T by more than `compare.tolerance` (5%) is refused before it trains, and the report
    shows every method's actual budget.
"phase2" is the ablation of Phase 1: Phase 2 alone from the base model, with SD-Zero's Phase 2 settings and steps
(its generations are reported, not matched: it spends only Phase 2's). With eval.revise_problems > 0 the base model,
SD-Zero's SRT model and the final SD-Zero model are also measured by generate-then-revise on the first
eval.revise_problems held-out problems (unbilled).
Sample-efficiency curves are measured on the first eval.curve_problems validation problems (training-side
problems kept out of N1 and N2, the same for every seed) at avg@eval.curve_k (the base model at 0 generations,
then along each run, always at its final budget); those evaluations are not billed to any method.
"Generations to reach GRPO" is the budget of the first point of a method's seed-mean curve at or above GRPO's
final seed-mean curve accuracy.

Selection (`compare.selection`): "none" evaluates each method's final model on the held-out set; "validation"
evaluates each method's model at its best validation curve point, chosen by the same rule on the same problems
and k for every method. Either way nothing is chosen on the held-out problems.

The run directory:
    config.yaml               the resolved configuration
    seed<S>/<method>/         metrics.jsonl (per step, with budget/... counters) of each method
    seed<S>/eval/<method>.jsonl   every held-out evaluation sample with its reward
    results.jsonl             one line per (seed, method) finished, with the settings that shaped it; a re-run
                              reuses a result only when those are unchanged, and recomputes it otherwise
    report.json, report.md    the comparison; sample_efficiency.png the curves
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sdzero.baselines import (GRPOBaselineConfig, RFTConfig, SDFTBaselineConfig, train_grpo, train_rft,
                              train_sdft)
from sdzero.budget import Budget, LearningCurve, relative_gap
from sdzero.compare_report import write_report
from sdzero.config import RunConfig, config_to_yaml, from_layers, override_dict, read_yaml
from sdzero.data import load_problem_sets
from sdzero.distill import teacher_context_limit
from sdzero.errors import Refusal
from sdzero.evaluate import evaluate, evaluate_revision
from sdzero.generation import Generator
from sdzero.modeling import max_positions
from sdzero.rundir import model_fingerprint, move_aside, stale_folder
from sdzero.stages import (Stages, curve_problems, load_run_model, phase2_prompt_ids, run_collect, run_phase2,
                           run_srt, trainable)
from sdzero.training import read_jsonl, seed_everything

# Imported from here by the command line and the tests.
from sdzero.compare_report import first_point_at, markdown_table  # noqa: F401

METHODS = ("sdzero", "rft", "grpo", "sdft", "phase2")
MATCHED = ("rft", "grpo", "sdft")
"""The baselines whose generations are matched to the target budget."""
SELECTIONS = ("none", "validation")
"""`compare.selection`: the final model of each method, or its best point on the validation curve."""


@dataclass
class CompareConfig:
    """`sdzero compare`: which methods, how many seeds, and the baselines' settings."""

    methods: str = "sdzero,rft,grpo,sdft"
    """Comma-separated methods to run (from: sdzero, rft, grpo, sdft, phase2 = Phase 2 alone from the base model)."""
    seeds: int = 3
    """Seeds run (the run seed, seed + 1, ...); each draws its own N1/N2 and sampling."""
    budget: int | None = None
    """Total generations per method; None = SD-Zero's actual count in each seed."""
    tolerance: float = 0.05
    """Largest allowed relative gap between a method's generations and the target."""
    selection: str = "none"
    """Which model of each method is evaluated on the held-out set: "none" = its final model; "validation" = its
    model at its best validation curve point (the same problems, k and rule for every method)."""
    rft: RFTConfig = field(default_factory=RFTConfig)
    grpo: GRPOBaselineConfig = field(default_factory=GRPOBaselineConfig)
    sdft: SDFTBaselineConfig = field(default_factory=SDFTBaselineConfig)

    def method_list(self) -> list[str]:
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = [m for m in names if m not in METHODS]
        if unknown or not names:
            raise Refusal(f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(METHODS)}")
        return names

    def validate(self) -> "CompareConfig":
        self.method_list()
        if self.seeds < 1:
            raise Refusal(f"compare.seeds must be >= 1, got {self.seeds}")
        if self.budget is not None and self.budget < 1:
            raise Refusal(f"compare.budget must be >= 1 generation, got {self.budget}")
        if not 0 < self.tolerance < 1:
            raise Refusal(f"compare.tolerance must lie in (0, 1), got {self.tolerance}")
        if self.selection not in SELECTIONS:
            raise Refusal(f"compare.selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        return self


def load_compare_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[RunConfig, CompareConfig]:
    """A run configuration (the usual keys) with a `compare:` section; "compare.x=v" overrides go there."""
    data = dict(read_yaml(path)) if path is not None else {}
    compare_layers = [(data.pop("compare", {}) or {}, str(path))] if path is not None else []
    run_layers = [(data, str(path))] if path is not None else []
    for item in overrides:
        nested = override_dict(item)
        layers = compare_layers if "compare" in nested else run_layers
        layers.append((nested.get("compare", nested), f"--set {item}"))
    run = from_layers(RunConfig, dataclasses.asdict(RunConfig()), run_layers).validate()
    return run, from_layers(CompareConfig, dataclasses.asdict(CompareConfig()), compare_layers, "compare.").validate()


def sdzero_nominal_generations(cfg: RunConfig) -> int:
    """SD-Zero's generations when every first answer is revised (collect.revise_correct)."""
    per_problem = cfg.collect.answers_per_problem * (1 + cfg.collect.revisions_per_answer)
    return cfg.n_phase1 * per_problem + cfg.distill.max_steps * cfg.distill.prompts_per_step


def baseline_questions(method: str, target: int, ccfg: CompareConfig) -> int:
    """How many questions a baseline samples on to spend about `target` generations."""
    if method == "rft":
        return max(1, round(target / ccfg.rft.samples_per_question))
    mcfg = ccfg.grpo if method == "grpo" else ccfg.sdft
    steps = max(1, round(target / (mcfg.prompts_per_step * mcfg.num_generations)))
    return steps * mcfg.prompts_per_step


def per_question(method: str, ccfg: CompareConfig) -> int:
    return {"rft": ccfg.rft.samples_per_question, "grpo": ccfg.grpo.num_generations,
            "sdft": ccfg.sdft.num_generations}[method]


def check_budget(method: str, planned: int, target: int, tolerance: float) -> None:
    gap = relative_gap(planned, target)
    if gap > tolerance:
        raise Refusal(f"{method} would spend {planned} generations against the matched budget of {target} "
                         f"({gap:.1%} off, more than the {tolerance:.0%} allowed); adjust compare.budget or "
                         f"the batch sizes")


def run_sdzero(stages: Stages, model, budget: Budget, *, target: int | None, curve_fn, revise_fn
               ) -> tuple[object, dict]:
    """SD-Zero through its stages (sdzero.stages) in its method folder, billing Phase 1 (first answers +
    revisions) and Phase 2; returns the trained model and a summary."""
    cfg = stages.cfg
    collection = run_collect(stages, Generator(model, stages.tokenizer, cfg.sampling))
    budget.question_ids.update(p["id"] for p in stages.sets.n1)
    budget.generations += collection["generations"]
    budget.sampled_tokens += collection["sampled_tokens"]
    steps = cfg.distill.max_steps
    if target is not None:
        steps = round((target - collection["generations"]) / cfg.distill.prompts_per_step)
        if steps < 1:
            raise Refusal(f"the budget of {target} generations leaves no Phase 2 step after Phase 1's "
                          f"{collection['generations']}; raise compare.budget or lower n_phase1")
    tuples = read_jsonl(stages.folder("phase1") / "revisions.jsonl")
    if not tuples:
        raise Refusal("SD-Zero's Phase 1 kept no verified revision; there is nothing for SRT to train on")
    model, srt = run_srt(stages, tuples, model)
    budget.trained(srt["trained_tokens"])
    srt_revise = None
    if revise_fn is not None:
        with budget.excluded():
            srt_revise = revise_fn(model, "srt")
    model, phase2 = billed_phase2(stages, model, budget, steps=steps, curve_fn=curve_fn)
    write_sdzero_metrics(stages.out, collection, srt["trained_tokens"])
    return model, {"phase1": collection, "srt_steps": srt["steps"], "srt_revise": srt_revise, **phase2}


def billed_phase2(stages: Stages, model, budget: Budget, *, steps: int, curve_fn) -> tuple[object, dict]:
    """Phase 2 for `steps` steps from `model` (SRT's, or the base model for the "phase2" ablation), billing its
    rollouts on top of what `budget` already holds; returns the model and its part of the summary."""
    # Phase 2 never picks its own best point: with compare.selection "validation" every method's best point is
    # picked the same way, by the curve function (BestOnValidation).
    distill_cfg = dataclasses.replace(stages.cfg.distill, keep_best=False, max_steps=steps)
    first_generations = budget.generations
    eval_walls = []  # the wall time billed when each Phase 2 evaluation starts

    def unbilled_curve(student) -> float:
        eval_walls.append(round(budget.wall_seconds, 2))
        with budget.excluded():
            return curve_fn(student)

    model, phase2 = run_phase2(stages, model, curve_fn=unbilled_curve, distill_cfg=distill_cfg)
    budget.generations += phase2["generations"]
    budget.sampled_tokens += phase2["sampled_tokens"]
    budget.trained(phase2["trained_tokens"])
    budget.question_ids.update(phase2_prompt_ids(stages.sets.n2, stages.cfg.seed,
                                                 steps * distill_cfg.prompts_per_step))
    curve = [{"generations": first_generations + h["step"] * distill_cfg.prompts_per_step,
              "accuracy": h["accuracy"], "step": h["step"]} for h in phase2["history"]]
    # A resumed Phase 2 holds evaluations from an earlier process, whose wall time this budget never saw.
    for point, wall in zip(curve[len(curve) - len(eval_walls):], eval_walls):
        point["wall_seconds"] = wall
    if not curve or curve[-1]["step"] != steps:
        final = LearningCurve(budget, curve_fn)
        final.point(model, step=steps)
        curve += final.points
    return model, {"phase2_steps": steps, "curve": curve}


class BestOnValidation:
    """A curve function that also keeps the trainable weights of the best model it has evaluated (the first one
    of the highest accuracy), so a method's held-out evaluation can use its best validation curve point."""

    def __init__(self, accuracy_fn):
        self.accuracy_fn = accuracy_fn
        self.calls, self.best_accuracy, self.best_call, self.best_weights = 0, None, None, None

    def __call__(self, model) -> float:
        accuracy = self.accuracy_fn(model)
        if self.best_accuracy is None or accuracy > self.best_accuracy:
            # Only what training changes: a LoRA run keeps its adapters, a full fine-tune every weight.
            self.best_weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
            self.best_accuracy, self.best_call = accuracy, self.calls
        self.calls += 1
        return accuracy

    def restore(self, model, curve: list[dict]) -> dict:
        """Load the best weights into `model`; which curve point they are (each evaluation is one point)."""
        if self.best_weights is None:
            raise Refusal("compare.selection validation: the method evaluated no validation curve point")
        unexpected = model.load_state_dict(self.best_weights, strict=False).unexpected_keys
        if unexpected:
            raise Refusal(f"compare.selection validation: the best model's weights do not fit the trained model "
                             f"({unexpected[0]!r})")
        point = curve[self.best_call] if self.best_call < len(curve) else {}
        return {"point": self.best_call, "generations": point.get("generations"),
                "validation_accuracy": self.best_accuracy}


def write_sdzero_metrics(out: Path, collection: dict, srt_trained_tokens: int) -> None:
    """SD-Zero's per-step metrics.jsonl for the whole method: SRT then Phase 2 steps, with budget counters
    that include Phase 1's collection (the stages' own logs count only their own stage)."""
    lines = []
    for row in read_jsonl(out / "srt" / "metrics.jsonl"):
        lines.append({**row, "budget/generations": collection["generations"],
                      "budget/sampled_tokens": collection["sampled_tokens"]})
    for row in read_jsonl(out / "phase2" / "metrics.jsonl"):
        if "budget/generations" in row:
            row = {**row, "budget/generations": collection["generations"] + row["budget/generations"],
                   "budget/sampled_tokens": collection["sampled_tokens"] + row["budget/sampled_tokens"],
                   "budget/trained_tokens": srt_trained_tokens + row["budget/trained_tokens"]}
        lines.append(row)
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def method_stages(cfg: RunConfig, sets, method_dir: Path, *, seed: int, progress: bool, log) -> Stages:
    """SD-Zero's stages in a method folder, which is no run directory (results.jsonl records what shaped each
    result): no stage is recorded or saved, and each stage goes on from the random state the one before left,
    as when compare's results were first recorded. Phase 2 writes into method_dir/phase2."""
    return Stages(cfg, method_dir, sets=sets, progress=progress, seeded=False, folders={"sdzero": "phase2"},
                  log=lambda *values: log(f"[seed {seed}] {method_dir.name}:", *values))


def train_baseline(method: str, model, tokenizer, cfg: RunConfig, ccfg: CompareConfig, pool: list[dict], verifier,
                   budget: Budget, method_dir: Path, *, target: int, curve_fn, seed: int, progress: bool, log):
    """RFT, GRPO or SDFT on the first questions of `pool` (N1 + N2) for about `target` generations, billed to
    `budget`; returns the trained model and the method's summary."""
    n_questions = baseline_questions(method, target, ccfg)
    if n_questions > len(pool):
        raise Refusal(f"{method} needs {n_questions} questions for {target} generations but N1 + N2 holds "
                      f"{len(pool)}; raise n_phase2 or lower the budget")
    check_budget(method, n_questions * per_question(method, ccfg), target, ccfg.tolerance)
    questions = pool[:n_questions]
    log(f"[seed {seed}] {method}: {n_questions} questions x {per_question(method, ccfg)} "
        f"= {n_questions * per_question(method, ccfg)} generations (target {target})")
    model = trainable(model, cfg)  # the same LoRA / gradient checkpointing settings as SD-Zero
    common = dict(seed=seed, evaluate_fn=curve_fn, system_prompt=cfg.system_prompt, progress=progress)
    if method == "rft":
        summary = train_rft(model, tokenizer, questions, verifier, Generator(model, tokenizer, cfg.sampling),
                            ccfg.rft, budget, out_dir=method_dir, **common)
    elif method == "grpo":
        summary = train_grpo(model, tokenizer, questions, verifier, cfg.sampling, ccfg.grpo, budget,
                             out_dir=method_dir, **common)
    else:
        summary = train_sdft(model, tokenizer, questions, cfg.sampling, ccfg.sdft, budget,
                             out_dir=method_dir, **common)
    return model, summary


def run_method(method: str, cfg: RunConfig, ccfg: CompareConfig, seed: int, out: Path, *, target: int | None,
               progress: bool, log, phase2_steps: int | None = None) -> dict:
    """Train one method from the base model for one seed; returns its results row. `phase2_steps`: the "phase2"
    ablation's steps (SD-Zero's Phase 2 steps in this seed; default distill.max_steps)."""
    seed_everything(seed)
    verifier = cfg.verifier()
    sets = load_problem_sets(cfg.data, cfg.task, cfg.n_phase1, cfg.n_phase2, cfg.eval.n_problems, seed,
                             n_validation=cfg.eval.n_validation())
    held_out, validation = sets.held_out, curve_problems(cfg, sets)
    model, tokenizer = load_run_model(cfg)
    method_dir = out / f"seed{seed}" / method

    def validation_accuracy(m) -> float:
        return evaluate(Generator(m, tokenizer, cfg.sampling), validation, verifier, k=cfg.eval.curve_k,
                        system_prompt=cfg.system_prompt, progress=False)["accuracy"]

    selecting = ccfg.selection == "validation" and method != "base"
    curve_fn = BestOnValidation(validation_accuracy) if selecting else validation_accuracy

    def revise(m, name: str) -> dict:
        return evaluate_revision(Generator(m, tokenizer, cfg.sampling), held_out[:cfg.eval.revise_problems],
                                 verifier, cfg.phrases(), k=cfg.eval.revise_k, feedback=cfg.eval.revise_feedback,
                                 system_prompt=cfg.system_prompt, desc=f"revise {name}", progress=progress,
                                 samples_path=out / f"seed{seed}" / "eval" / f"{name}_revise.jsonl")

    revise_fn = revise if cfg.eval.revise_problems else None
    budget = Budget()
    if method == "base":
        summary = {"curve": [{"generations": 0, "wall_seconds": 0.0, "accuracy": curve_fn(model)}]}
    elif method == "sdzero":
        stages = method_stages(cfg, sets, method_dir, seed=seed, progress=progress, log=log)
        model, summary = run_sdzero(stages, model, budget, target=ccfg.budget, curve_fn=curve_fn, revise_fn=revise_fn)
    elif method == "phase2":
        stages = method_stages(cfg, sets, method_dir, seed=seed, progress=progress, log=log)
        model, summary = billed_phase2(stages, model, budget, steps=phase2_steps or cfg.distill.max_steps,
                                       curve_fn=curve_fn)
    else:
        model, summary = train_baseline(method, model, tokenizer, cfg, ccfg, sets.n1 + sets.n2, verifier, budget,
                                        method_dir, target=target, curve_fn=curve_fn, seed=seed, progress=progress,
                                        log=log)
    spent = budget.summary()
    if selecting:
        summary["selected"] = curve_fn.restore(model, summary.get("curve", []))
        log(f"[seed {seed}] {method}: evaluating its model of validation curve point {summary['selected']['point']} "
            f"(validation avg@{cfg.eval.curve_k} = {summary['selected']['validation_accuracy']:.3f})")
    result = evaluate(Generator(model, tokenizer, cfg.sampling), held_out, verifier, k=cfg.eval.k,
                      system_prompt=cfg.system_prompt, samples_path=out / f"seed{seed}" / "eval" / f"{method}.jsonl",
                      desc=f"evaluate {method}", progress=progress)
    row = {"seed": seed, "method": method, "accuracy": result["accuracy"], "mean_length": result["mean_length"],
           **spent, "target_generations": target, "summary": summary}
    if revise_fn is not None and method in ("base", "sdzero"):
        row["revise"] = revise_fn(model, method)
    if method != "base":
        if target is not None:
            row["budget_gap"] = relative_gap(spent["generations"], target)
        log(f"[seed {seed}] {method}: avg@{cfg.eval.k} = {result['accuracy']:.3f}, {spent['generations']} generations, "
            f"{spent['wall_seconds']:.0f} s")
    else:
        log(f"[seed {seed}] base: avg@{cfg.eval.k} = {result['accuracy']:.3f}")
    return row


def compare(cfg: RunConfig, ccfg: CompareConfig, out_dir: str | Path, *, progress: bool = True, log=print) -> dict:
    """Run every method for every seed (skipping those already in results.jsonl); write and return the report."""
    teacher_context_limit(cfg.distill.teacher_max_length, max_positions(cfg.model))  # refused before any file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_to_yaml(cfg) + yaml.safe_dump({"compare": dataclasses.asdict(ccfg)},
                                                                         sort_keys=False))
    results_path = out / "results.jsonl"
    # Later lines win: a result recomputed under new settings is appended after the one it replaces.
    done = {(r["seed"], r["method"]): r for r in read_jsonl(results_path)} if results_path.exists() else {}
    methods = ccfg.method_list()
    base_model = model_fingerprint(cfg.model)
    # SD-Zero first: without a fixed budget its actual count is the baselines' target.
    reported = [m for m in METHODS if m in methods]
    order = ["base"] + reported
    wanted = []
    for seed in range(cfg.seed, cfg.seed + ccfg.seeds):
        seed_cfg = dataclasses.replace(cfg, seed=seed)
        for method in order:
            phase2_steps = None
            if method == "phase2":
                # the ablation repeats SD-Zero's Phase 2, unmatched: it spends no Phase 1 generations
                target = None
                if (seed, "sdzero") in done:
                    phase2_steps = done[(seed, "sdzero")]["summary"]["phase2_steps"]
            elif ccfg.budget is not None:
                target = ccfg.budget
            elif method in ("base", "sdzero"):
                target = None  # the base model spends nothing; SD-Zero's own count is the target
            elif "sdzero" in methods:
                target = done[(seed, "sdzero")]["generations"]
            else:
                target = sdzero_nominal_generations(cfg)
            settings = method_settings(seed_cfg, ccfg, method, target, base_model)
            if phase2_steps is not None:
                settings["phase2_steps"] = phase2_steps
            wanted.append((seed, method))
            old = done.get((seed, method))
            if old is not None and old.get("settings") == settings:
                continue
            if old is not None:
                stale = stale_folder(out)
                move_aside(out, [f"seed{seed}/{method}", f"seed{seed}/eval/{method}.jsonl"], stale)
                log(f"[seed {seed}] {method}: its recorded result was measured with other settings; recomputing "
                    f"(the old files are in {stale})")
            row = run_method(method, seed_cfg, ccfg, seed, out, target=target, progress=progress, log=log,
                             phase2_steps=phase2_steps)
            row["settings"] = settings
            done[(seed, method)] = row
            with results_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            write_report(out, cfg, ccfg, reported, [done[key] for key in wanted])
    return write_report(out, cfg, ccfg, reported, [done[key] for key in wanted])


def method_settings(cfg: RunConfig, ccfg: CompareConfig, method: str, target: int | None, base_model: str) -> dict:
    """What shapes one (seed, method) result: a re-run reuses the result only when all of it is unchanged
    (as JSON reads it back, so that a fresh value compares equal to a recorded one)."""
    run = {key: value for key, value in dataclasses.asdict(cfg).items() if key not in ("log", "evolve")}
    # SD-Zero's own stages do not shape the other methods' results (the ablation keeps Phase 2's)
    for key in {"sdzero": (), "phase2": ("collect", "srt")}.get(method, ("collect", "srt", "distill")):
        run.pop(key)
    settings = {"run": run, "base_model": base_model, "target_generations": target, "tolerance": ccfg.tolerance,
                "selection": ccfg.selection if method != "base" else None,
                "method": dataclasses.asdict(getattr(ccfg, method)) if method in ("rft", "grpo", "sdft") else None}
    return json.loads(json.dumps(settings))
