"""Run configuration: one dataclass per stage, composed into `RunConfig`, read from YAML.

Every field is documented where it is defined (the docstring under it). A YAML file sets any
subset of fields; `--set section.field=value` on the command line overrides single fields. Unknown
keys and wrongly typed values are refused with the file and the key named.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sdzero.checks import check_ranges
from sdzero.collect import CollectConfig
from sdzero.data import DataConfig, check_source
from sdzero.distill import DistillConfig
from sdzero.errors import MissingFile, Refusal
from sdzero.evaluate import FEEDBACK
from sdzero.generation import SamplingConfig
from sdzero.modeling import DTYPES, LoraConfig
from sdzero.prompts import ControlPhrases
from sdzero.srt import SRTConfig
from sdzero.training import LogConfig
from sdzero.rewards import Verifier, make_verifier


MAX_SEED = 2**32 - 1
"""The largest run seed: numpy's limit, and far from torch's, so the seeds derived from it stay in range."""


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    k: int = 8
    """Samples per problem for avg@k (paper: 8)."""
    n_problems: int = 200
    """Held-out problems evaluated (the same ones for every run seed)."""
    validation_problems: int | None = None
    """Validation problems: taken from the training pool next to N1 and N2 (never held out, the same for every
    run seed). Phase 2's learning curve, keep-best, the plateau rule and the gated refresh are measured on them,
    so the held-out set only gives the final figures. None: eval.curve_problems."""
    curve_problems: int = 100
    """Validation problems the Phase 2 learning curve (avg@curve_k) is measured on: the first N of them."""
    curve_k: int = 2
    """Samples per problem for the learning curve."""
    revise_problems: int = 100
    """Generate-then-revise in the demo on the first N held-out problems (0: skip it)."""
    revise_k: int = 2
    """First answers per problem for generate-then-revise; each is revised once."""
    revise_feedback: str = "reward"
    """Phrase before the revision: "reward" = P_r of the verifier's reward (as in Phase 1), "wrong" =
    always the wrong-answer phrase (no verifier consulted before revising)."""

    def validate(self) -> None:
        check_ranges("eval", self, {"k": ">= 1", "n_problems": ">= 1", "validation_problems": ">= 1",
                                    "curve_problems": ">= 1", "curve_k": ">= 1", "revise_problems": ">= 0",
                                    "revise_k": ">= 1"})
        if self.revise_feedback not in FEEDBACK:
            raise Refusal(f"eval.revise_feedback must be one of {', '.join(FEEDBACK)}, got {self.revise_feedback!r}")

    def n_validation(self) -> int:
        """How many validation problems the run draws (validation_problems, or curve_problems when unset)."""
        return self.curve_problems if self.validation_problems is None else self.validation_problems


@dataclass
class EvolveConfig:
    """Self-evolution (`sdzero demo --self-evolve`): Phase 2 from the SRT model twice, with the same
    seed, once with a frozen teacher and once with the teacher synchronised to the student."""

    max_steps: int = 200
    """Phase 2 steps of each run (the demo's Phase 2 is shorter; the comparison needs room past the frozen run's
    peak, which came after 60 to 150 steps on the lab task)."""
    sync_every: int | None = None
    """Synced run: copy the student into the teacher every N steps (None: only on a plateau)."""
    sync_patience: int | None = 2
    """Synced run: copy the student into the teacher when the tracked accuracy has not improved for this
    many evaluations (None: only every sync_every steps)."""
    eval_every: int = 10
    """Steps between evaluations of the tracked accuracy (avg@eval.curve_k on the first eval.curve_problems
    validation problems)."""


@dataclass
class RunConfig:
    """A whole SD-Zero run: base model -> Phase 1 -> SRT -> Phase 2 -> evaluation."""

    model: str = "lab"
    """Base model: "lab" (the built-in lab model), "lab-v2" or "lab-control" (the lab's v2 and control models,
    see `sdzero.lab.model`), a real model by name ("smollm2-135m-instruct"; `sdzero models` lists them), a .gguf
    file, a local folder or a hub id (any causal LM whose tokenizer has a chat template)."""
    task: str | list[str] = "lab"
    """Verifier: "lab" (the built-in task), "math" (math-verify on the last \\boxed{}), "code" (tests run in the
    sandbox), "reasoning-gym" (the generator's own score_answer, for data.source reasoning-gym:NAME),
    "trl:accuracy_reward" or "trl:reasoning_accuracy_reward" (TRL's own, on the `solution` column), or
    "package.module:function" for your own reward function, either (completion, row) -> float or TRL's
    (prompts, completions, completion_ids, **columns) -> list[float | None]. A list names several functions,
    combined as in `reward_weights`."""
    reward_weights: list[float] | None = None
    """Weight of each function in `task` (TRL's reward_weights; default 1 each). The reward is their weighted sum."""
    reward_threshold: float | None = None
    """r = 1 (a right answer) iff the weighted sum reaches this; None = the sum of the weights (of the functions
    that gave a value), i.e. every function gave its full reward of 1."""
    dtype: str = "auto"
    """Weights dtype: "auto" (fp32 weights; training computes in bf16 autocast on a GPU that supports it),
    "float32", "bfloat16" or "float16" (half-precision weights: half the memory, but updates smaller than
    their rounding step are lost)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    seed: int = 0
    """Seed of the problem split, sampling and training order."""
    control_preset: str = "paper"
    """Control phrases P_r: "paper", "qwen" or "olmo"."""
    control_correct: str | None = None
    """Overrides the preset's phrase after a correct answer."""
    control_wrong: str | None = None
    """Overrides the preset's phrase after a wrong answer."""
    system_prompt: str | None = None
    """System message put before every problem. None (or "", the same): the chat template's own choice, which is no
    system turn for most templates, and the template's default system message for those that add one when a
    conversation has none (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
    run.json records the message the prompts actually carry."""
    n_phase1: int = 6000
    """Problems for Phase 1 (N1; paper: 6K)."""
    n_phase2: int = 9000
    """Problems for Phase 2 (N2, disjoint from N1; paper: 9K)."""
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    srt: SRTConfig = field(default_factory=SRTConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: LogConfig = field(default_factory=LogConfig)
    evolve: EvolveConfig = field(default_factory=EvolveConfig)

    def verifier(self) -> Verifier:
        """The run's reward functions, weighted and thresholded into r."""
        return make_verifier(self.task, self.reward_weights, self.reward_threshold)

    def phrases(self) -> ControlPhrases:
        preset = ControlPhrases.preset(self.control_preset)
        return ControlPhrases(self.control_correct or preset.correct, self.control_wrong or preset.wrong)

    def validate(self) -> "RunConfig":
        """Refuse bad settings, alone or in combination, before any model loads or any file is written."""
        self.phrases()
        for section in (self.sampling, self.collect, self.srt, self.distill, self.eval, self.lora):
            section.validate()
        self.verifier()
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise Refusal(f"unknown dtype {self.dtype!r}; choose auto, {', '.join(DTYPES)}")
        if self.dtype == "float16" and not self.lora.enabled:
            # AdamW's eps (1e-8) is 0 in float16, so the first update divides by zero: every weight NaN.
            raise Refusal("dtype float16 cannot train all weights (AdamW's eps rounds to 0 in float16 and the "
                             "first step makes the weights NaN); use dtype auto (fp32 weights, bf16 autocast on a "
                             "GPU) or bfloat16")
        if self.lora.enabled and (self.distill.sync_every or self.distill.sync_patience or
                                  self.distill.refresh_margin is not None):
            raise Refusal("teacher refreshes (distill.sync_every, sync_patience, refresh_margin) copy the "
                             "student's full weights and are not available with lora.enabled: train all weights "
                             "or keep the teacher frozen")
        if self.evolve.sync_every is None and self.evolve.sync_patience is None:
            raise Refusal("evolve needs evolve.sync_every or evolve.sync_patience: the synced run must sync")
        check_ranges("evolve", self.evolve, {"max_steps": ">= 1", "sync_every": ">= 1", "sync_patience": ">= 1",
                                             "eval_every": ">= 1"})
        check_source(self.data, self.task)
        if self.data.path is None and self.data.source is None and self.task != "lab":
            raise Refusal(f"data.path is required for task {self.task!r} (only the lab task has built-in problems)")
        if self.data.path is None and self.data.source is None and (self.data.eval_path or self.data.eval_split):
            raise Refusal("data.eval_path and data.eval_split need data.path: the lab task's problems are "
                             "built in, with their own held-out set")
        check_ranges("", self, {"n_phase1": ">= 1", "n_phase2": ">= 1"})
        if not 0 <= self.seed <= MAX_SEED:
            # refused here, not after the model has loaded: torch, numpy and random all take this range
            raise Refusal(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        return self


def _coerce(value, annotation, where: str):
    """Check `value` against a field's type annotation (resolved), converting int -> float."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ValueError:
                pass
        raise Refusal(f"{where}: expected {annotation}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise Refusal(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 5e-6 (no dot) as a string
        except ValueError:
            pass
    if isinstance(annotation, type) and not isinstance(value, annotation) or \
            (annotation is int and isinstance(value, bool)):
        raise Refusal(f"{where}: expected {annotation.__name__}, got {value!r}")
    if annotation is float and not math.isfinite(value):
        raise Refusal(f"{where}: expected a finite number, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str, prefix: str = ""):
    """An instance of the dataclass `cls` from a mapping; `where` (a file, a --set) and the key path
    (`prefix` + key) name any unknown key or wrongly typed value."""
    if not isinstance(data, dict):
        raise Refusal(f"{where}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise Refusal(f"{where}: unknown key {prefix + key!r}; known keys: {', '.join(sorted(known))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, f"{where}: {prefix}{key}")
    return cls(**kwargs)


def from_layers(cls, data: dict, layers: list[tuple[dict, str]], prefix: str = ""):
    """`from_dict` of `data` updated by each (mapping, where) layer in turn: a bad key or value is
    blamed on the layer that brought it, not on a file the user never edited."""
    result = from_dict(cls, data, "defaults", prefix)
    for update, where in layers:
        _merge(data, update, where)
        result = from_dict(cls, data, where, prefix)
    return result


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file, with the file named in any error."""
    path = Path(path)
    if not path.exists():
        raise MissingFile(f"config file not found: {path}")
    if not path.is_file():
        raise Refusal(f"{path} is not a file: --config takes a YAML file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise Refusal(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        raise Refusal(f"{path}: not valid YAML ({yaml_problem(err)})") from err


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML parse error in one line (PyYAML's own message spans several, with a picture of the place)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(err, "problem", None) or err).split())


def override_dict(item: str) -> dict:
    """"a.b=value" -> {"a": {"b": value}}, the value read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise Refusal(f"override {item!r} must look like section.field=value")
    nested: dict = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    try:
        cursor[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise Refusal(f"--set {item}: the value is not valid YAML ({yaml_problem(err)})") from err
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: RunConfig | None = None) -> RunConfig:
    """Base config (or defaults), updated by the YAML file at `path`, then by "a.b=value" overrides."""
    layers = [(read_yaml(path), str(path))] if path is not None else []
    layers += [(override_dict(item), f"--set {item}") for item in overrides]
    cfg = from_layers(RunConfig, dataclasses.asdict(base or RunConfig()), layers)
    if cfg.system_prompt == "":
        cfg.system_prompt = None  # an empty system message lays out no system turn: the same prompts as None
    return cfg.validate()


LAB_DEMO = Path(__file__).parent / "lab" / "demo.yaml"
"""The lab demo's settings: the defaults for the lab models."""
PRESETS = Path(__file__).parent / "presets"
"""Shipped settings for registered real models (`sdzero.models.RealModel.preset` names one)."""


@dataclass(frozen=True)
class Settings:
    """Where a command's settings come from when it is not given a config file."""

    path: Path | None
    """The YAML file to load (None: the `RunConfig` defaults, the paper's)."""
    description: str
    """What the settings are, as the command's "settings: ..." line says it."""


def default_settings(config: str | Path | None, model: str | None) -> Settings:
    """The settings a command uses: its --config when given; otherwise chosen by its --model, so that no model
    runs silently on settings tuned for another. A lab model (or no --model) gets the lab demo's; a stage of a
    run (RUN/srt, RUN/sdzero) that run's (RUN/config.yaml); a registered real model its shipped preset; any
    other model the paper's defaults."""
    from sdzero import lab, models

    if config is not None:
        return Settings(Path(config), str(config))
    if model is None or model in lab.LAB_MODELS:
        return Settings(LAB_DEMO, f"the lab demo's ({LAB_DEMO})")
    run = Path(model).expanduser().parent
    if (run / "config.yaml").is_file() and (run / "run.json").is_file():
        return Settings(run / "config.yaml", f"the run's ({run / 'config.yaml'})")
    entry = models.REAL_MODELS.get(model)
    if entry is not None and entry.preset is not None:
        path = PRESETS / f"{entry.preset}.yaml"
        return Settings(path, f"preset {entry.preset} ({path})")
    return Settings(None, "the paper's defaults")


def _merge(target: dict, update: dict, where: str) -> None:
    if not isinstance(update, dict):
        raise Refusal(f"{where}: expected a mapping at the top level")
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, where)
        else:
            target[key] = value


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
