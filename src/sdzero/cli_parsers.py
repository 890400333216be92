"""The command line's arguments: `sdzero COMMAND --help` shows what is written here (docs/cli.md is made
from it by `python -m sdzero.reference docs`)."""

from __future__ import annotations

import argparse
from pathlib import Path

USAGE_ERROR = 2
"""Exit code of a refused command: bad settings, bad data, stages out of order, a missing file."""

class Parser(argparse.ArgumentParser):
    """argparse with its errors (unknown command or flag, a bad value) in one line, like every other error."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


RESUME_HELP = ("continue a killed run: the stages and evaluations it finished are reused; collection, SRT and "
               "Phase 2 go on from their files and checkpoints")


def _config_options(parser: argparse.ArgumentParser, config_help: str, set_help: str) -> None:
    """--config and --set, the run configuration and overrides of its fields (`sdzero.config` reads both)."""
    parser.add_argument("--config", type=Path, help=config_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help=set_help)


def _common(parser: argparse.ArgumentParser) -> None:
    _config_options(parser, "YAML run configuration (default: chosen by --model: the lab demo's for the lab models "
                            "and without --model, a real model's preset, a run's own for its stage folders, "
                            "otherwise the paper's defaults; the command prints which)",
                    "override one configuration field, e.g. --set distill.lr=1e-4 (repeatable)")
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
    _stage_parsers(commands)
    _eval_parser(commands)
    _inspect_parser(commands)
    _compare_parser(commands)
    _check_parser(commands)
    _models_parser(commands)
    _lab_parser(commands)
    return parser


# The whole method (demo, run) and its stages one at a time (collect, srt, distill).
def _stage_parsers(commands) -> None:
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


# sdzero eval: avg@k and pass@k on the held-out problems.
def _eval_parser(commands) -> None:
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


# sdzero inspect: the per-token teacher-student signal of a run.
def _inspect_parser(commands) -> None:
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


# sdzero compare: SD-Zero vs RFT / GRPO / SDFT at a matched sample budget.
def _compare_parser(commands) -> None:
    compare = commands.add_parser("compare", help="SD-Zero vs RFT, GRPO and SDFT at the same sample budget",
                                  description="Runs each method from the same base model on the same questions with "
                                              "matched generations, evaluates all with the same avg@k, and writes "
                                              "OUT/report.json, OUT/report.md and OUT/sample_efficiency.png.")
    compare.add_argument("--out", type=Path, required=True, help="run directory (a re-run resumes it)")
    _config_options(compare, "YAML run configuration with an optional compare: section (default: the lab demo's)",
                    "override one field, e.g. --set compare.grpo.lr=1e-5 (repeatable)")
    compare.add_argument("--methods", help="comma-separated subset of sdzero,rft,grpo,sdft,phase2 (phase2: Phase 2 "
                                           "alone from the base model)")
    compare.add_argument("--seeds", type=int, help="number of seeds")
    compare.add_argument("--seed", type=int, help="first seed")
    compare.add_argument("--budget", type=int, help="total generations per method (default: SD-Zero's actual count)")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")


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
    _config_options(check, "YAML run configuration (its data: and task: settings)",
                    "override one configuration field, e.g. --set data.tests_field=cases (repeatable)")
    check.add_argument("--limit", type=int, help="check only the first N rows")
    check.add_argument("--quiet", action="store_true", help="no progress bar")


# sdzero lab: the built-in lab task and base model.
def _lab_parser(commands) -> None:
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
