"""Command line: `sdzero demo`, the three stages, evaluation, and the lab tools."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import traceback
from pathlib import Path

from sdzero.errors import MissingFile, Refusal

DEMO_CONFIG = Path(__file__).parent / "lab" / "demo.yaml"
"""The lab demo's settings (`sdzero.config.LAB_DEMO`)."""
USAGE_ERROR = 2
"""Exit code of a refused command: bad settings, bad data, stages out of order, a missing file."""
NOTHING_TO_TRAIN = 3
"""Exit code of a stage with nothing to train on (Phase 1 kept no verified revision), so that
`sdzero collect ... && sdzero srt ... && sdzero distill ...` stops where the run cannot go on."""
INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT, as shells report it)."""


class NothingToTrain(Exception):
    """A stage found nothing to train on; the message says why."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors (unknown command or flag, a bad value) in one line, like every other error."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


RESUME_HELP = ("continue a killed run: the stages and evaluations it finished are reused; collection, SRT and "
               "Phase 2 go on from their files and checkpoints")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path,
                        help="YAML run configuration (default: chosen by --model: the lab demo's for the lab models "
                             "and without --model, a real model's preset, a run's own for its stage folders, "
                             "otherwise the paper's defaults; the command prints which)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one configuration field, e.g. --set distill.lr=1e-4 (repeatable)")
    parser.add_argument("--seed", type=int, help="run seed (problem split, sampling, training order)")
    parser.add_argument("--model", help='base model: "lab" (or "lab-v2", "lab-control"), "smollm2-135m-instruct", a '
                                        'save_pretrained folder, a .gguf file, or a hub id (see sdzero models)')
    parser.add_argument("--data", help="problems: a hub dataset id or a local .jsonl / .json / .parquet file "
                                       "(sets data.path)")
    parser.add_argument("--task", help='the verifier: "math", "code", "lab", or package.module:function')
    parser.add_argument("--max-new-tokens", type=int, help="longest sampled response")
    parser.add_argument("--limit", type=int, help="use at most N problems in each set (N1, N2, validation, held-out)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--restart", action="store_true",
                        help="when OUT was made with other settings, move the outputs they make stale to "
                             "OUT/stale/<time>/ and start again (without it, such a command is refused)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sdzero", description=(
        "SD-Zero: self-revision turns a verifier's binary reward into dense token-level supervision."))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="the whole method on the built-in lab task (CPU, minutes)",
                               description="Base model -> Phase 1 (collect, SRT) -> Phase 2 (self-distillation) -> "
                                           "avg@k of base, SRT and SD-Zero on held-out lab problems.")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default: %(default)s)")
    demo.add_argument("--resume", action="store_true", help=RESUME_HELP)
    demo.add_argument("--self-evolve", action="store_true",
                      help="Phase 2 from OUT/srt twice, frozen teacher vs teacher sync (settings: evolve.*); "
                           "writes OUT/evolve/report.json and self_evolution.png (runs the demo first if needed)")
    _common(demo)

    run = commands.add_parser("run", help="the whole method on any model and data, from a config",
                              description="Base model -> Phase 1 (collect, SRT) -> Phase 2 -> evaluation, "
                                          "as `demo` does, for the model, data and settings of --config.")
    run.add_argument("--out", type=Path, required=True, help="run directory")
    run.add_argument("--resume", action="store_true", help=RESUME_HELP)
    _common(run)

    collect = commands.add_parser("collect", help="Phase 1 data: first answers, revisions, verified tuples",
                                  description="Writes OUT/phase1/revisions.jsonl; re-running skips problems done.")
    collect.add_argument("--out", type=Path, required=True, help="run directory")
    _common(collect)

    srt = commands.add_parser("srt", help="Phase 1 training (Self-Revision Training) on OUT/phase1/revisions.jsonl",
                              description="Trains the base model on the kept tuples; saves OUT/srt.")
    srt.add_argument("--out", type=Path, required=True, help="run directory (reads phase1/, writes srt/)")
    srt.add_argument("--resume", action="store_true", help="continue from OUT/srt/checkpoint")
    _common(srt)

    distill = commands.add_parser("distill", help="Phase 2 on-policy self-distillation",
                                  description="Student = --model (default OUT/srt); teacher = --teacher or a frozen "
                                              "copy of the student. Saves OUT/sdzero.")
    distill.add_argument("--out", type=Path, required=True, help="run directory (writes sdzero/)")
    distill.add_argument("--teacher", help="teacher checkpoint (default: a frozen copy of the student)")
    distill.add_argument("--max-steps", type=int, help="Phase 2 optimiser steps")
    distill.add_argument("--resume", action="store_true", help="continue from OUT/sdzero/checkpoint")
    _common(distill)

    evaluate = commands.add_parser("eval", help="avg@k and pass@k of a model on the held-out problems",
                                   description="In a run directory, the run's recorded held-out problems (--n: the "
                                               "first N); outside one, the config's (the same for every seed).")
    evaluate.add_argument("--k", type=int, help="samples per problem (default: the config's eval.k)")
    evaluate.add_argument("--n", type=int, help="held-out problems: the first N of the run's held-out set (default: "
                                                "all of it), or outside a run the config's eval.n_problems")
    evaluate.add_argument("--out", type=Path, help="write the report and the samples here")
    evaluate.add_argument("--run", type=Path,
                          help="run directory whose recorded held-out set is evaluated (default: the run holding "
                               "--model or --out, if any)")
    evaluate.add_argument("--revise", action="store_true",
                          help="also generate-then-revise: revise each first answer after the control phrase and "
                               "report initial and revised accuracy, correction rate and lengths "
                               "(settings: eval.revise_k, eval.revise_feedback)")
    _common(evaluate)

    inspect = commands.add_parser("inspect", help="per-token teacher-student signal of a run, as HTML and text",
                                  description="Writes OUT/index.html, OUT/signals.jsonl and, on the lab task, "
                                              "OUT/localization.json.")
    inspect.add_argument("--run", type=Path, required=True, help="run directory (with srt/, sdzero/, eval/)")
    inspect.add_argument("--out", type=Path, help="output folder (default: RUN/inspect)")
    inspect.add_argument("--n", type=int, default=200, help="responses to analyse (default: %(default)s)")
    inspect.add_argument("--student", default="srt",
                         help="student stage: base, or a stage folder of the run; its eval/<student>.jsonl answers "
                              "are scored (default: %(default)s, with the default teacher: the Phase 2 signal at "
                              "step 0)")
    inspect.add_argument("--teacher", default="srt",
                         help="teacher stage: base, or a stage folder of the run (default: %(default)s)")
    inspect.add_argument("--quiet", action="store_true")

    _compare_parser(commands)
    _check_parser(commands)
    _models_parser(commands)

    lab = commands.add_parser("lab", help="the built-in lab task and base model")
    lab_commands = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")
    from sdzero.lab import LAB_MODELS, PRETRAIN_CPU_MINUTES

    pretrain_help = f"train the lab base model from scratch (~{PRETRAIN_CPU_MINUTES} CPU minutes)"
    pretrain = lab_commands.add_parser("pretrain", help=pretrain_help)
    pretrain.add_argument("--out", type=Path, required=True, help="folder for the model and tokenizer")
    pretrain.add_argument("--preset", choices=[preset for _, preset in LAB_MODELS.values()], default="v1",
                          help="the corpus recipe: v1 (the shipped lab model), v2 (revisions re-read the problem "
                               "and slip less) or control (v2's corpus with no revision advantage)")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    pretrain.add_argument("--quiet", action="store_true")
    show = lab_commands.add_parser("problems", help="print lab problems with their worked solutions")
    show.add_argument("--n", type=int, default=5)
    show.add_argument("--split", choices=["train", "eval"], default="eval")
    errors = lab_commands.add_parser("errors", help="what the first error of each wrong lab answer is",
                                     description="For the wrong answers (reward 0) in evaluation samples (JSONL rows "
                                                 "with id, response, reward, e.g. RUN/eval/sdzero.jsonl), counts the "
                                                 "kind of the first error in the first attempt.")
    errors.add_argument("files", nargs="+", type=Path, metavar="FILE")
    return parser


_FROM_ARGS = object()


def _run_config(args, run_dir: Path | None = None, model_flag=_FROM_ARGS, announce: bool = True):
    """The command's configuration: --config, or the settings `default_settings` picks for the --model flag
    (`model_flag`, when the command has put a default of its own into args.model). In a run directory that records a
    --limit, a command without --limit uses the recorded one: the stage commands of a run work on the same sets.
    `announce`: print the "settings: ..." line now (eval prints it on stderr once its model has loaded)."""
    from sdzero.config import default_settings, load_config
    from sdzero.rundir import recorded_limit

    overrides = list(args.overrides)
    for flag, key in (("seed", "seed"), ("model", "model"), ("data", "data.path"), ("task", "task"),
                      ("max_new_tokens", "sampling.max_new_tokens"), ("max_steps", "distill.max_steps"),
                      ("k", "eval.k")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    settings = default_settings(args.config, args.model if model_flag is _FROM_ARGS else model_flag)
    cfg = load_config(settings.path, overrides)
    args.settings_line = f"settings: {settings.description}"
    if announce:
        say(args.settings_line)
    if getattr(args, "limit", None) is None and hasattr(args, "limit"):
        args.limit = recorded_limit(run_dir)
    if args.limit is not None:
        if args.limit < 1:
            raise Refusal(f"--limit must be >= 1, got {args.limit}")
        cfg.n_phase1, cfg.n_phase2 = min(cfg.n_phase1, args.limit), min(cfg.n_phase2, args.limit)
        cfg.eval.n_problems = min(cfg.eval.n_problems, args.limit)
        cfg.eval.validation_problems = min(cfg.eval.n_validation(), args.limit)
    from sdzero.training import seed_everything

    seed_everything(cfg.seed)
    return cfg


def _open_run(args, cfg):
    """The run record of OUT, checked against this command (a different run is refused), or made."""
    from sdzero.rundir import open_run
    from sdzero.training import is_main_process, wait_for_everyone

    record = open_run(args.out, cfg, limit=args.limit, restart=args.restart, main_process=is_main_process(),
                      log=say)
    wait_for_everyone()
    return record


def say(*values) -> None:
    """print, once: under `accelerate launch` only the main process speaks."""
    from sdzero.training import is_main_process

    if is_main_process():
        print(*values)


def set_threads() -> None:
    """CPU threads for the long commands: all cores up to 8, or OMP_NUM_THREADS when it is set (on a
    shared machine, two jobs with a thread per core each slow each other down many times over)."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(os.cpu_count() or 1, 8)))


def _print_table(report: dict) -> None:
    names = [n for n in ("base", "srt", "sdzero") if n in report["accuracy"]]
    print(f"\n{'model':<8} {report['metric']:>8} {'pass@' + str(report['k']):>8} {'length':>8}")
    for name in names:
        passk = report["pass@k"][name].get(f"pass@{report['k']}", float("nan"))
        print(f"{name:<8} {report['accuracy'][name]:>8.3f} {passk:>8.3f} {report['mean_length'][name]:>8.1f}")
    revise = report.get("revise", {})
    if revise:
        print(f"\ngenerate-then-revise ({next(iter(revise.values()))['n_answers']} first answers each)")
        print(f"{'model':<8} {'initial':>8} {'revised':>8} {'correct':>8} {'len y':>8} {'len rev':>8}")
        for name in (n for n in names if n in revise):
            r = revise[name]
            rate = float("nan") if r["correction_rate"] is None else r["correction_rate"]
            print(f"{name:<8} {r['initial_accuracy']:>8.3f} {r['revised_accuracy']:>8.3f} {rate:>8.1%} "
                  f"{r['initial_length']:>8.1f} {r['revised_length']:>8.1f}")
    print(f"\n{report['n_eval_problems']} held-out problems, {report['wall_seconds']:.0f} s in all")


def cmd_demo(args) -> None:
    from sdzero.pipeline import run_pipeline

    cfg = _run_config(args, args.out)
    set_threads()
    if getattr(args, "self_evolve", False):  # a `demo` flag; `run` shares this command
        from sdzero.evolve import self_evolution

        report = self_evolution(cfg, args.out, progress=not args.quiet, limit=args.limit)
        print(f"\n{'teacher':<8} {report['metric']:>8} {'length':>8}  syncs")
        for name, run in report["runs"].items():
            print(f"{name:<8} {run['accuracy']:>8.3f} {run['mean_length']:>8.1f}  {run['syncs'] or '-'}")
        print(f"wrote {args.out / 'evolve' / 'report.json'} and {args.out / 'evolve' / 'self_evolution.png'}")
        return
    report = run_pipeline(cfg, args.out, progress=not args.quiet, limit=args.limit, restart=args.restart,
                          resume=args.resume)
    _print_table(report)
    if "srt" not in report["accuracy"]:
        raise NothingToTrain(f"Phase 1 kept no verified revision, so the run stopped after evaluating the base model "
                             f"(wrote {args.out / 'report.json'})")
    print(f"wrote {args.out / 'report.json'}" + (f" and {args.out / 'learning_curve.png'}"
                                                   if (args.out / 'learning_curve.png').exists() else ""))


def cmd_collect(args) -> None:
    from sdzero.collect import collect
    from sdzero.generation import make_generator
    from sdzero.modeling import load_tokenizer, max_positions
    from sdzero.pipeline import load_run_model, problem_sets
    from sdzero.prompts import check_prompt_room
    from sdzero.rundir import begin_stage, check_base_model, phase1_settings
    from sdzero.training import is_main_process, wait_for_everyone

    cfg = _run_config(args, args.out)
    record = _open_run(args, cfg)
    main = is_main_process()
    n1 = problem_sets(cfg, record_dir=args.out).n1
    tokenizer = load_tokenizer(cfg.model)
    check_prompt_room(tokenizer, {"N1": n1}, cfg.system_prompt, max_positions(cfg.model))
    fingerprint = check_base_model(args.out, record, cfg, tokenizer, main_process=main)
    # Collection always continues the problems already done, so only the same settings may add to them.
    begin_stage(args.out, "phase1", phase1_settings(cfg, fingerprint), restart=args.restart, resume=True,
                main_process=main, log=say)
    wait_for_everyone()
    model, tokenizer = load_run_model(cfg)
    summary = collect(make_generator(model, tokenizer, cfg.sampling), n1, cfg.verifier(), cfg.phrases(),
                      args.out / "phase1", cfg.collect, system_prompt=cfg.system_prompt, progress=not args.quiet,
                      seed=cfg.seed)
    say(json.dumps(summary, indent=2))
    if summary["kept"] == 0:
        raise NothingToTrain("no verified revision was kept: there is nothing for SRT to train on")


def cmd_srt(args) -> None:
    from sdzero.modeling import load_tokenizer
    from sdzero.pipeline import load_run_model, save_stage, trainable
    from sdzero.rundir import begin_stage, check_base_model, srt_settings
    from sdzero.srt import check_tuples, train_srt
    from sdzero.training import is_main_process, read_jsonl, wait_for_everyone

    cfg = _run_config(args, args.out)
    path = args.out / "phase1" / "revisions.jsonl"
    if not path.exists():
        raise MissingFile(f"{path} not found; run `sdzero collect --out {args.out}` first")
    record = _open_run(args, cfg)
    main = is_main_process()
    rows = read_jsonl(path)
    if not rows:
        raise NothingToTrain(f"{path} holds no verified revision: nothing to train on")
    tokenizer = load_tokenizer(cfg.model)
    check_tuples(rows, tokenizer, path)
    fingerprint = check_base_model(args.out, record, cfg, tokenizer, main_process=main)
    begin_stage(args.out, "srt", srt_settings(cfg, fingerprint, path), restart=args.restart, resume=args.resume,
                main_process=main, log=say)
    wait_for_everyone()
    model, tokenizer = load_run_model(cfg)
    model = trainable(model, cfg)
    summary = train_srt(model, tokenizer, rows, cfg.phrases(), cfg.srt, out_dir=args.out / "srt", seed=cfg.seed,
                        system_prompt=cfg.system_prompt, progress=not args.quiet, resume=args.resume,
                        log_config=cfg.log)
    save_stage(model, tokenizer, args.out / "srt", cfg, "srt")  # every process: the main one writes
    say(json.dumps(summary, indent=2))
    say(f"saved {args.out / 'srt'}")


def cmd_distill(args) -> None:
    from sdzero.distill import check_teacher_room, distill, teacher_context_limit
    from sdzero.generation import make_generator
    from sdzero.lab.diagnostics import gold_digit_tokens
    from sdzero.modeling import load_tokenizer, max_positions, same_tokenizer
    from sdzero.pipeline import curve_accuracy, curve_problems, load_run_model, problem_sets, save_stage, trainable
    from sdzero.prompts import check_prompt_room
    from sdzero.rundir import begin_stage, check_base_model, check_tokenizer, model_fingerprint, sdzero_settings
    from sdzero.training import is_main_process, wait_for_everyone

    model_flag = args.model
    if args.model is None:
        if not (args.out / "srt" / "config.json").exists():
            raise MissingFile(f"{args.out / 'srt'} holds no SRT model; run `sdzero srt --out {args.out}` first, "
                                    "or give the student with --model")
        args.model = str(args.out / "srt")
    cfg = _run_config(args, args.out, model_flag=model_flag)
    teacher_context_limit(cfg.distill.teacher_max_length, max_positions(args.teacher or cfg.model))
    record = _open_run(args, cfg)
    main = is_main_process()
    # Refusals that need only the tokenizers come before any model loads.
    tokenizer = load_tokenizer(cfg.model)
    if record.get("base_model") is None:  # Phase 2 is the run's first stage: the student is its base model
        check_base_model(args.out, record, cfg, tokenizer, main_process=main)
    check_tokenizer(args.out, record, cfg.model, tokenizer)
    if args.teacher and not same_tokenizer(tokenizer, load_tokenizer(args.teacher)):
        raise Refusal(f"the teacher {args.teacher} uses another tokenizer than the student {cfg.model}: it must "
                         "score the student's token ids, so both need the same vocabulary")
    sets = problem_sets(cfg, record_dir=args.out)
    n2, validation = sets.n2, curve_problems(cfg, sets)
    check_prompt_room(tokenizer, {"N2": n2, "validation": validation}, cfg.system_prompt, max_positions(cfg.model))
    check_teacher_room(tokenizer, n2, cfg.phrases(), cfg.distill.teacher_max_length, cfg.system_prompt)
    teacher_fingerprint = model_fingerprint(args.teacher) if args.teacher else "frozen copy of the student"
    begin_stage(args.out, "sdzero", sdzero_settings(cfg, model_fingerprint(cfg.model), teacher_fingerprint),
                restart=args.restart, resume=args.resume, resume_may_change=("distill.max_steps",),
                main_process=main, log=say)
    wait_for_everyone()
    model, tokenizer = load_run_model(cfg)
    teacher = load_run_model(cfg, args.teacher)[0] if args.teacher else None
    model = trainable(model, cfg)
    verifier = cfg.verifier()
    # The validation curve, as `run` tracks it: eval_every, keep-best and the refresh rules depend on it.
    generator = make_generator(model, tokenizer, cfg.sampling)
    curve = curve_accuracy(cfg, generator, validation, verifier)
    summary = distill(model, tokenizer, n2, verifier, cfg.phrases(), cfg.sampling, cfg.distill,
                      teacher=teacher, out_dir=args.out / "sdzero", seed=cfg.seed, evaluate_fn=curve,
                      system_prompt=cfg.system_prompt, progress=not args.quiet, resume=args.resume,
                      log_config=cfg.log, generator=generator,
                      diagnostics=gold_digit_tokens if cfg.task == "lab" else None)
    save_stage(model, tokenizer, args.out / "sdzero", cfg, "sdzero")  # every process: the main one writes
    best = (f"; kept the best student on the validation curve, step {summary['best_step']} "
            f"({summary['best_accuracy']:.3f})" if cfg.distill.keep_best and summary["best_step"] is not None else "")
    say(f"{summary['steps']} steps in {summary['seconds']:.0f} s{best}; saved {args.out / 'sdzero'}")


def eval_run_dir(args) -> Path | None:
    """The run whose held-out set `eval` uses: --run, else the run holding --model (RUN/srt, RUN/sdzero) or
    --out; None for a model outside any run (the held-out set is then drawn from the config)."""
    if args.run is not None:
        if not (args.run / "split.json").exists():
            raise MissingFile(f"{args.run} is not a run directory: it has no split.json")
        return args.run
    for folder in ([Path(args.model)] if args.model else []) + ([args.out] if args.out else []):
        if (folder.parent / "split.json").exists():
            return folder.parent
    return None


def cmd_eval(args) -> None:
    from sdzero.evaluate import evaluate, evaluate_revision
    from sdzero.generation import make_generator
    from sdzero.modeling import load_tokenizer, max_positions
    from sdzero.pipeline import load_run_model, problem_sets
    from sdzero.prompts import check_prompt_room
    from sdzero.rundir import begin_stage, differences, model_fingerprint, read_run, run_identity, stage_settings
    from sdzero.training import read_json

    run = eval_run_dir(args)
    cfg = _run_config(args, run, announce=False)
    if args.n is not None:
        cfg.eval.n_problems = args.n
    if run is None:
        cfg.n_phase1 = cfg.n_phase2 = 0  # only the held-out problems are needed
        cfg.eval.validation_problems = 0
        held_out = problem_sets(cfg).held_out
    else:
        # The run's recorded held-out set, never a new draw: --n takes a prefix of it.
        split = read_json(run / "split.json")
        n = cfg.eval.n_problems if args.n is not None else len(split["held_out"])
        if n > len(split["held_out"]):
            raise Refusal(f"--n {n}: the held-out set of {run} has {len(split['held_out'])} problems "
                             f"(the others are training problems or not in the run)")
        cfg.n_phase1, cfg.n_phase2 = len(split["n_phase1"]), len(split["n_phase2"])
        cfg.eval.n_problems = len(split["held_out"])
        cfg.eval.validation_problems = len(split.get("validation", []))  # none in a split from an older sdzero
        record = read_run(run)
        found = differences(record["identity"], run_identity(cfg)) if record else []
        if found:
            raise Refusal(f"this command's settings are not those of the run in {run} ({'; '.join(found[:3])}): "
                             f"evaluate with its configuration, --config {run / 'config.yaml'}")
        held_out = problem_sets(cfg, record_dir=run).held_out[:n]
    if args.out:
        settings = stage_settings(model=model_fingerprint(cfg.model), problems=[p["id"] for p in held_out],
                                  k=cfg.eval.k, sampling=cfg.sampling,
                                  revise={"k": cfg.eval.revise_k, "feedback": cfg.eval.revise_feedback}
                                  if args.revise else None)
        begin_stage(args.out.parent, args.out.name, settings, restart=args.restart, log=say)
    check_prompt_room(load_tokenizer(cfg.model), {"held-out": held_out}, cfg.system_prompt, max_positions(cfg.model))
    if run is not None:
        print(f"evaluating the first {len(held_out)} problems of the held-out set of {run}", file=sys.stderr)
    model, tokenizer = load_run_model(cfg)
    print(args.settings_line, file=sys.stderr)  # stdout is the report; every refusal has come before this line
    generator, verifier = make_generator(model, tokenizer, cfg.sampling), cfg.verifier()
    report = evaluate(generator, held_out, verifier, k=cfg.eval.k, system_prompt=cfg.system_prompt,
                      samples_path=args.out / "samples.jsonl" if args.out else None, progress=not args.quiet)
    if args.revise:
        report["revise"] = evaluate_revision(
            generator, held_out, verifier, cfg.phrases(), k=cfg.eval.revise_k, feedback=cfg.eval.revise_feedback,
            system_prompt=cfg.system_prompt, samples_path=args.out / "revise.jsonl" if args.out else None,
            progress=not args.quiet)
    print(json.dumps(report, indent=2))
    if args.out:
        (args.out / "report.json").write_text(json.dumps(report, indent=2))


def cmd_inspect(args) -> None:
    from sdzero.analysis import format_summary, inspect_run

    if args.n < 1:
        raise Refusal(f"--n must be >= 1, got {args.n}")
    summary = inspect_run(args.run, args.out or args.run / "inspect", n=args.n, student=args.student,
                          teacher=args.teacher, progress=not args.quiet)
    print(format_summary(summary))


def cmd_lab(args) -> None:
    if args.lab_command == "pretrain":
        from dataclasses import replace

        from sdzero.lab.model import PRESETS, pretrain

        cfg = replace(PRESETS[args.preset], seed=args.seed)
        if args.steps is not None:
            if args.steps < 1:
                raise Refusal(f"--steps must be >= 1, got {args.steps}")
            cfg.steps = args.steps
        path = pretrain(args.out, cfg, progress=not args.quiet)
        print(f"saved the lab base model to {path}")
    elif args.lab_command == "errors":
        from sdzero.lab.task import error_counts

        for path in args.files:
            if not path.is_file():
                raise MissingFile(f"evaluation samples not found: {path}")
            try:
                counts = error_counts(path)
            except UnicodeDecodeError as err:
                raise Refusal(f"{path}: not UTF-8 text ({err.reason})") from err
            kinds = ", ".join(f"{kind} {n}" for kind, n in counts["kinds"].items())
            print(f"{path}: {counts['answers']} answers, {counts['wrong']} wrong; first error of their first "
                  f"attempt: {kinds}")
    else:
        from sdzero.lab.task import sample_problems, write_solution

        for problem in sample_problems(args.n, split=args.split, seed=0):
            print(f"{problem.text}\n  {write_solution(problem)}")


# sdzero compare: SD-Zero vs RFT / GRPO / SDFT at a matched sample budget.
def _compare_parser(commands) -> None:
    compare = commands.add_parser("compare", help="SD-Zero vs RFT, GRPO and SDFT at the same sample budget",
                                  description="Runs each method from the same base model on the same questions with "
                                              "matched generations, evaluates all with the same avg@k, and writes "
                                              "OUT/report.json, OUT/report.md and OUT/sample_efficiency.png.")
    compare.add_argument("--out", type=Path, required=True, help="run directory (a re-run resumes it)")
    compare.add_argument("--config", type=Path,
                         help="YAML run configuration with an optional compare: section (default: the lab demo's)")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                         help="override one field, e.g. --set compare.grpo.lr=1e-5 (repeatable)")
    compare.add_argument("--methods", help="comma-separated subset of sdzero,rft,grpo,sdft,phase2 (phase2: Phase 2 alone from the base model)")
    compare.add_argument("--seeds", type=int, help="number of seeds")
    compare.add_argument("--seed", type=int, help="first seed")
    compare.add_argument("--budget", type=int, help="total generations per method (default: SD-Zero's actual count)")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_compare(args) -> None:
    from sdzero.compare import compare, load_compare_config, markdown_table
    from sdzero.config import default_settings

    overrides = list(args.overrides)
    for flag, key in (("methods", "compare.methods"), ("seeds", "compare.seeds"), ("budget", "compare.budget"),
                      ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    settings = default_settings(args.config, None)
    cfg, ccfg = load_compare_config(settings.path, overrides)
    print(f"settings: {settings.description}")
    set_threads()
    report = compare(cfg, ccfg, args.out, progress=not args.quiet)
    print("\n" + markdown_table(report))
    print(f"wrote {args.out / 'report.json'}, {args.out / 'report.md'} and {args.out / 'sample_efficiency.png'}")


# sdzero models: the models known by name, and any of them (or a GGUF file) as a plain Hugging Face folder.
def _models_parser(commands) -> None:
    models = commands.add_parser("models", help="list the models known by name; write one out as a plain folder",
                                 description="Without NAME: every model name a config's model: accepts, where it "
                                             "comes from, whether it is installed and its folder. With NAME (or a "
                                             ".gguf file): materialise it and print its folder, or with --out write "
                                             "it into OUT as a plain Hugging Face folder.")
    models.add_argument("name", nargs="?", metavar="NAME", help="a model name from the list, or a .gguf file")
    models.add_argument("--out", type=Path, help="write the model into this new folder")
    models.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_models(args) -> None:
    from sdzero.modeling import export
    from sdzero.models import format_listing, listing

    if args.name is None:
        if args.out is not None:
            raise Refusal("--out needs a NAME: sdzero models NAME --out DIR")
        print(format_listing(listing()))
    elif args.out is not None:
        export(args.name, args.out)
    else:
        from sdzero.modeling import resolve_model_path

        folder = resolve_model_path(args.name)
        if not Path(folder).is_dir():
            raise Refusal(f"unknown model name {args.name!r}; see sdzero models for the names, or give a "
                             f".gguf file or a save_pretrained folder")
        print(folder)


# sdzero check: does every row's own reference pass the run's verifier?
def _check_parser(commands) -> None:
    check = commands.add_parser("check", help="score each row's own reference solution with the run's verifier",
                                description="Loads the problems as a run does, turns each row's reference (the "
                                            "field --solution-field names) into a response and scores it: code as "
                                            "it is, math as \\boxed{ref}, reasoning-gym in its answer format. "
                                            "Exit code 0 when every row passes, 1 when some fail or error.")
    check.add_argument("--data", required=True, metavar="FILE_OR_SOURCE",
                       help="a .jsonl / .json / .parquet file, a hub dataset id, or a source: humaneval, "
                            "reasoning-gym:NAME")
    check.add_argument("--task", help='the verifier: "math", "code", ... (default: the config\'s)')
    check.add_argument("--solution-field", required=True, metavar="FIELD",
                       help="the field holding each row's reference (e.g. canonical_solution, code, answer); "
                            '"none" scores a non-answer (an empty response for code, the problem text otherwise)')
    check.add_argument("--out", type=Path, help="write OUT/failures.jsonl (failing and erroring rows, with the "
                                                "reason) and OUT/check.json (the counts)")
    check.add_argument("--config", type=Path, help="YAML run configuration (its data: and task: settings)")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override one configuration field, e.g. --set data.tests_field=cases (repeatable)")
    check.add_argument("--limit", type=int, help="check only the first N rows")
    check.add_argument("--quiet", action="store_true", help="no progress bar")


class SomeRowsFailed(Exception):
    """`sdzero check` found rows whose reference does not pass."""


def cmd_check(args) -> None:
    from sdzero.config import load_config
    from sdzero.data import SOURCES
    from sdzero.datacheck import check_data, format_summary

    if args.limit is not None and args.limit < 1:
        raise Refusal(f"--limit must be >= 1, got {args.limit}")
    prefix = args.data.partition(":")[0]
    if prefix in SOURCES or prefix == "reasoning-gym":
        where = ["data.path=null", f"data.source={args.data}"]
    else:
        where = ["data.source=null", f"data.path={args.data}"]
    task = [f"task={args.task}"] if args.task else []
    cfg = load_config(args.config, [*args.overrides, *where, *task])
    print("settings: " + (str(args.config) if args.config else "the paper's defaults"))
    summary = check_data(cfg, args.solution_field, limit=args.limit, out_dir=args.out, progress=not args.quiet)
    print(format_summary(summary))
    if args.out is not None:
        print(f"wrote {args.out / 'failures.jsonl'} and {args.out / 'check.json'}")
    if summary["passed"] != summary["rows"]:
        raise SomeRowsFailed()


COMMANDS = {"demo": cmd_demo, "run": cmd_demo, "collect": cmd_collect, "srt": cmd_srt, "distill": cmd_distill,
            "eval": cmd_eval, "inspect": cmd_inspect, "lab": cmd_lab, "compare": cmd_compare, "check": cmd_check,
            "models": cmd_models}


def resume_hint(command: str, argv: list[str]) -> str:
    """How to go on after Ctrl-C, for each command."""
    again = shlex.join(["sdzero", *argv])
    if command in ("srt", "distill", "run", "demo"):
        return f"continue from its last checkpoint with: {again}" + ("" if "--resume" in argv else " --resume")
    if command == "collect":
        return f"re-run {again} to go on with the problems not collected yet"
    if command == "compare":
        return f"re-run {again}: finished (seed, method) results are reused"
    return f"re-run {again} to start it again"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # its notes on tied weights are expected here
    if getattr(args, "quiet", False):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        COMMANDS[args.command](args)
    except Refusal as err:
        # sdzero's own refusal: the message is the whole story. Anything else is a bug and keeps its traceback.
        if os.environ.get("SDZERO_DEBUG") == "1":
            traceback.print_exc()
        print(f"sdzero {args.command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except NothingToTrain as err:
        print(f"sdzero {args.command}: {err}", file=sys.stderr)
        return NOTHING_TO_TRAIN
    except SomeRowsFailed:
        return 1
    except KeyboardInterrupt:
        print(f"\nsdzero {args.command}: interrupted; {resume_hint(args.command, argv)}", file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
