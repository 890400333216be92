"""SD-Zero's stages, each with its set-up, written once: Phase 1 collection, SRT, Phase 2.

`sdzero run` / `sdzero demo` (sdzero.pipeline), the stage commands `collect`, `srt` and `distill` (sdzero.cli)
and the SD-Zero method of `sdzero compare` all run them through `run_collect`, `run_srt` and `run_phase2` on a
`Stages`, which holds what the stages of one run share.

In a run directory (`open_stages`) every stage is set up the same way: what can be refused is refused before
any model loads (prompts past the model's positions, another base model or tokenizer than the run's, a stage
folder made with other settings), the stage's settings are recorded (sdzero.rundir), each stage starts from the
run seed, and a trained stage is saved as a plain model folder with summary.json written last. Compare's
method folders are no run directory: compare records its results itself, keeps no model, and its stages go
on from one random stream (their recorded results came from that stream).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from sdzero.cards import evaluation_figures, run_card_fields, write_model_card
from sdzero.collect import collect
from sdzero.config import RunConfig
from sdzero.data import ProblemSets, load_problem_sets
from sdzero.distill import check_teacher_room, distill
from sdzero.errors import Refusal
from sdzero.evaluate import evaluate
from sdzero.generation import make_generator
from sdzero.lab.diagnostics import gold_digit_tokens
from sdzero.modeling import (is_lora, load_model, load_tokenizer, max_positions, merged_for_saving,
                             prepare_for_training, same_tokenizer)
from sdzero.phase2_io import PromptOrder
from sdzero.prompts import check_prompt_room
from sdzero.rundir import (begin_stage, check_base_model, check_tokenizer, model_fingerprint, open_run,
                           phase1_settings, sdzero_settings, srt_settings)
from sdzero.srt import check_tuples, train_srt
from sdzero.training import (full_weights, is_fsdp2, is_main_process, read_json, seed_everything,
                             wait_for_everyone)

SUMMARY_FILE = "summary.json"
"""A trained stage's summary, written last: the stage is done (`run --resume` reuses it)."""
FROZEN_TEACHER = "frozen copy of the student"
"""Phase 2's teacher without --teacher, as its settings record it."""


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


def curve_accuracy(cfg: RunConfig, generator, problems: list[dict], verifier):
    """Phase 2's `evaluate_fn`: avg@curve_k on `problems` of the weights the generator samples from
    (Phase 2 refreshes it with the student's after every step). Every point samples from the run seed on a
    random state of its own: the curve compares weights on the same draws, and tracking it leaves the
    rollouts Phase 2 trains on as they are."""
    def accuracy(student) -> float:
        return evaluate(generator, problems, verifier, k=cfg.eval.curve_k, system_prompt=cfg.system_prompt,
                        progress=False, seed=cfg.seed)["accuracy"]
    return accuracy


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


@dataclass
class Stages:
    """What the stages of one run share: its configuration, the folder they write into, the problem sets,
    the tokenizer, and how they run."""

    cfg: RunConfig
    out: Path
    record: dict | None = None
    """The run record of a run directory (sdzero.rundir); None for compare's method folders, where no stage
    is checked, recorded or saved."""
    sets: ProblemSets | None = None
    """N1, N2, validation, held-out: given, or the run's recorded ones (`load_sets`)."""
    progress: bool = True
    resume: bool = False
    """Collection, SRT and Phase 2 go on from their files and checkpoints."""
    restart: bool = False
    """A stage folder made with other settings moves aside instead of being refused."""
    reuse_done: bool = False
    """`run --resume`: a stage with its summary.json is loaded, not trained again."""
    seeded: bool = True
    """Each stage starts from the run seed (and collection from a seed per chunk); False for compare, whose
    stages go on from the random state the one before left."""
    log: Callable = print
    evaluate_model: Callable[[str, object], dict | None] | None = None
    """`evaluate_model(stage, model)` after each training stage (a whole run's held-out evaluation); its report
    goes into the model card."""
    folders: dict[str, str] = field(default_factory=dict)
    """Folder names of stages that are not their stage's name (compare: {"sdzero": "phase2"})."""

    def folder(self, stage: str) -> Path:
        return self.out / self.folders.get(stage, stage)

    @cached_property
    def tokenizer(self):
        """The tokenizer of cfg.model (the run's base model; the student for the distill command)."""
        return load_tokenizer(self.cfg.model)

    @cached_property
    def verifier(self):
        return self.cfg.verifier()

    @cached_property
    def phrases(self):
        return self.cfg.phrases()

    @cached_property
    def base_fingerprint(self) -> str:
        """cfg.model checked against the run's base model, or recorded as it by the run's first stage."""
        return check_base_model(self.out, self.record, self.cfg, self.tokenizer, main_process=is_main_process())

    def load_sets(self) -> ProblemSets:
        if self.sets is None:
            self.sets = problem_sets(self.cfg, record_dir=self.out, log=self.log)
        return self.sets

    def check_room(self, named_sets: dict[str, list[dict]]) -> None:
        check_prompt_room(self.tokenizer, named_sets, self.cfg.system_prompt, max_positions(self.cfg.model))

    def begin(self, stage: str, settings: dict, *, resume: bool, may_change: tuple[str, ...] = ()) -> None:
        """Check the stage's settings against its folder's record, then record them (sdzero.rundir)."""
        begin_stage(self.out, stage, settings, restart=self.restart, resume=resume, resume_may_change=may_change,
                    main_process=is_main_process(), log=self.log)
        wait_for_everyone()

    def evaluated(self, stage: str, model) -> dict | None:
        return self.evaluate_model(stage, model) if self.evaluate_model else None


def open_stages(cfg: RunConfig, out: str | Path, *, limit: int | None = None, restart: bool = False, log=print,
                **how) -> Stages:
    """The stages of the run directory `out`: its run record checked against `cfg` (a different run is refused;
    with `restart` moved aside) or made. `limit`: the --limit the sets were cut to. `how`: `Stages` fields."""
    record = open_run(out, cfg, limit=limit, restart=restart, main_process=is_main_process(), log=log)
    wait_for_everyone()
    return Stages(cfg, Path(out), record=record, restart=restart, log=log, **how)


def begin_collect(stages: Stages, checked: dict[str, list[dict]] | None = None) -> None:
    """Phase 1's set-up: the prompts of `checked` (default: N1) fit the model, the base model is the run's,
    and Phase 1's settings are the folder's. Collection always continues the problems already done, so only
    the same settings may add to them."""
    stages.check_room(checked or {"N1": stages.load_sets().n1})
    stages.begin("phase1", phase1_settings(stages.cfg, stages.base_fingerprint), resume=True)


def run_collect(stages: Stages, generator) -> dict:
    """Phase 1 on N1: first answers, revisions after the reward's phrase, the verified tuples kept
    (phase1/revisions.jsonl); returns its counts."""
    cfg, n1 = stages.cfg, stages.load_sets().n1
    stages.log(f"Phase 1: collecting revisions on {len(n1)} problems")
    collection = collect(generator, n1, stages.verifier, stages.phrases, stages.folder("phase1"), cfg.collect,
                         system_prompt=cfg.system_prompt, progress=stages.progress,
                         seed=cfg.seed if stages.seeded else None)
    stages.log(f"Phase 1: {collection['kept']} verified revisions kept ({collection['kept_after_wrong']} after a "
               f"wrong answer, {collection['kept_after_right']} after a right one; first-answer accuracy "
               f"{collection['first_answer_accuracy']:.3f})")
    return collection


def run_srt(stages: Stages, rows: list[dict], model=None):
    """Self-Revision Training on the kept tuples `rows` (phase1/revisions.jsonl), from `model` (default: the
    run's base model, loaded once the stage is set up); returns the trained model and SRT's summary."""
    cfg, tuples_path = stages.cfg, stages.folder("phase1") / "revisions.jsonl"
    if stages.record is not None:
        check_tuples(rows, stages.tokenizer, tuples_path)
        stages.begin("srt", srt_settings(cfg, stages.base_fingerprint, tuples_path), resume=stages.resume)

    def train(student) -> dict:
        return train_srt(student, stages.tokenizer, rows, stages.phrases, cfg.srt, out_dir=stages.folder("srt"),
                         seed=cfg.seed, system_prompt=cfg.system_prompt, progress=stages.progress,
                         resume=stages.resume, log_config=cfg.log)

    return train_stage(stages, "srt", model, train)


def check_phase2(stages: Stages, teacher: str | None = None) -> None:
    """Phase 2's refusals that need only the tokenizers, before any model loads: the student cfg.model (and
    `teacher`) read the run's token ids, every N2 and validation prompt fits the model, and the teacher's
    context holds a prompt, an answer and P_r."""
    cfg, tokenizer = stages.cfg, stages.tokenizer
    if stages.record.get("base_model") is None:  # Phase 2 is the run's first stage: the student is its base model
        stages.base_fingerprint
    check_tokenizer(stages.out, stages.record, cfg.model, tokenizer)
    if teacher and not same_tokenizer(tokenizer, load_tokenizer(teacher)):
        raise Refusal(f"the teacher {teacher} uses another tokenizer than the student {cfg.model}: it must "
                      "score the student's token ids, so both need the same vocabulary")
    sets = stages.load_sets()
    stages.check_room({"N2": sets.n2, "validation": curve_problems(cfg, sets)})
    check_teacher_room(tokenizer, sets.n2, stages.phrases, cfg.distill.teacher_max_length, cfg.system_prompt)


def run_phase2(stages: Stages, model=None, *, student: str | None = None, teacher: str | None = None,
               generator=None, curve_fn=None, distill_cfg=None, may_extend: bool = False):
    """Phase 2, on-policy self-distillation on N2, from `model` (default: cfg.model, loaded once the stage
    is set up); returns the trained model and Phase 2's summary.

    `student`: the starting model's name for the stage's settings (default cfg.model); `teacher`: a model
    folder (default: a frozen copy of the student); `generator`: the sampler of the rollouts and of the curve
    (default: one made from the student); `curve_fn`: the validation curve (default: avg@curve_k on the
    curve problems); `distill_cfg`: default cfg.distill; `may_extend`: a resumed stage may change
    distill.max_steps, to run on past its planned end."""
    cfg = stages.cfg
    if stages.record is not None:
        settings = sdzero_settings(cfg, model_fingerprint(student or cfg.model),
                                   model_fingerprint(teacher) if teacher else FROZEN_TEACHER)
        stages.begin("sdzero", settings, resume=stages.resume,
                     may_change=("distill.max_steps",) if may_extend else ())

    def train(trained) -> dict:
        teacher_model = load_run_model(cfg, teacher)[0] if teacher else None
        sampler = generator or make_generator(trained, stages.tokenizer, cfg.sampling)
        curve = curve_fn or curve_accuracy(cfg, sampler, curve_problems(cfg, stages.sets), stages.verifier)
        return distill(trained, stages.tokenizer, stages.sets.n2, stages.verifier, stages.phrases, cfg.sampling,
                       distill_cfg or cfg.distill, teacher=teacher_model, out_dir=stages.folder("sdzero"),
                       seed=cfg.seed, evaluate_fn=curve, system_prompt=cfg.system_prompt,
                       progress=stages.progress, resume=stages.resume, log_config=cfg.log, generator=sampler,
                       diagnostics=gold_digit_tokens if cfg.task == "lab" else None)

    stages.load_sets()
    return train_stage(stages, "sdzero", model, train)


def train_stage(stages: Stages, stage: str, model, train: Callable[[object], dict]):
    """One training stage: `train(student)` on `model` (None: cfg.model, loaded) made trainable, then
    `stages.evaluate_model`; in a run directory the model is saved with that evaluation, and summary.json last.
    With `reuse_done`, a stage whose summary.json is there is loaded and evaluated instead."""
    cfg, folder = stages.cfg, stages.folder(stage)
    if stages.reuse_done and (folder / SUMMARY_FILE).exists():
        stages.log(f"{stage}: trained before; loading {folder}")
        model = load_run_model(cfg, str(folder))[0]
        stages.evaluated(stage, model)
        return model, read_json(folder / SUMMARY_FILE)
    if model is None:
        model = load_run_model(cfg)[0]
    model = trainable(model, cfg)
    if stages.seeded:
        seed_everything(cfg.seed)
    summary = train(model)
    evaluation = stages.evaluated(stage, model)
    if stages.record is not None:
        save_stage(model, stages.tokenizer, folder, cfg, stage, evaluation)  # every process: the main one writes
        if is_main_process():
            (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))  # last: marks the stage done
    return model, summary


def phase2_prompt_ids(problems: list[dict], seed: int, n: int) -> list:
    """The ids of the first `n` prompts Phase 2 draws from `problems` with `seed`: its prompt order
    (phase2_io.PromptOrder) replayed, as every process of Phase 2 draws it."""
    order = PromptOrder(len(problems), seed)
    return [problems[i]["id"] for i in order.next_batch(n)]
