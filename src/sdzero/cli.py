"""Command line: `sdzero demo`, the three stages, evaluation, and the lab tools."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import traceback
from pathlib import Path

from sdzero.cli_parsers import USAGE_ERROR, build_parser  # noqa: F401  (USAGE_ERROR: the exit codes are here)
from sdzero.errors import MissingFile, Refusal

DEMO_CONFIG = Path(__file__).parent / "lab" / "demo.yaml"
"""The lab demo's settings (`sdzero.config.LAB_DEMO`)."""
NOTHING_TO_TRAIN = 3
"""Exit code of a stage with nothing to train on (Phase 1 kept no verified revision), so that
`sdzero collect ... && sdzero srt ... && sdzero distill ...` stops where the run cannot go on."""
INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT, as shells report it)."""


class NothingToTrain(Exception):
    """A stage found nothing to train on; the message says why."""


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


def _open_stages(args, cfg, **how):
    """The stages of the run directory OUT, its record checked against this command (a different run is refused)
    or made."""
    from sdzero.stages import open_stages

    return open_stages(cfg, args.out, limit=args.limit, restart=args.restart, log=say, progress=not args.quiet,
                       **how)


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
    from sdzero.generation import make_generator
    from sdzero.stages import begin_collect, load_run_model, run_collect

    stages = _open_stages(args, _run_config(args, args.out))
    begin_collect(stages)
    model = load_run_model(stages.cfg)[0]
    summary = run_collect(stages, make_generator(model, stages.tokenizer, stages.cfg.sampling))
    say(json.dumps(summary, indent=2))
    if summary["kept"] == 0:
        raise NothingToTrain("no verified revision was kept: there is nothing for SRT to train on")


def cmd_srt(args) -> None:
    from sdzero.stages import run_srt
    from sdzero.training import read_jsonl

    cfg = _run_config(args, args.out)
    path = args.out / "phase1" / "revisions.jsonl"
    if not path.exists():
        raise MissingFile(f"{path} not found; run `sdzero collect --out {args.out}` first")
    stages = _open_stages(args, cfg, resume=args.resume)
    rows = read_jsonl(path)
    if not rows:
        raise NothingToTrain(f"{path} holds no verified revision: nothing to train on")
    summary = run_srt(stages, rows)[1]
    say(json.dumps(summary, indent=2))
    say(f"saved {args.out / 'srt'}")


def cmd_distill(args) -> None:
    from sdzero.distill import teacher_context_limit
    from sdzero.modeling import max_positions
    from sdzero.stages import check_phase2, run_phase2

    model_flag = args.model
    if args.model is None:
        if not (args.out / "srt" / "config.json").exists():
            raise MissingFile(f"{args.out / 'srt'} holds no SRT model; run `sdzero srt --out {args.out}` first, "
                              "or give the student with --model")
        args.model = str(args.out / "srt")
    cfg = _run_config(args, args.out, model_flag=model_flag)
    teacher_context_limit(cfg.distill.teacher_max_length, max_positions(args.teacher or cfg.model))
    stages = _open_stages(args, cfg, resume=args.resume)
    check_phase2(stages, args.teacher)  # the refusals that need only the tokenizers come before any model loads
    summary = run_phase2(stages, teacher=args.teacher, may_extend=True)[1]
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
