"""Every shipped config loads and validates on the CPU without downloading anything: run recipes through
`sdzero.config.load_config` (unknown keys and wrong types fail there), accelerate configs through
accelerate's own config loader."""

import re
from pathlib import Path

import pytest
import yaml

from sdzero import config
from sdzero.compare import load_compare_config
from sdzero.lab import LAB_MODELS
from sdzero.models import REAL_MODELS
from sdzero.generation import vllm_importable

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "accelerate" not in p.parts) + \
    [ROOT / "src" / "sdzero" / "lab" / "demo.yaml"] + sorted((ROOT / "src" / "sdzero" / "presets").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_config(path: Path):
    """A run config; a comparison config (with a `compare:` section) through the comparison's loader.

    The GPU recipes sample with vLLM, which cannot be installed here: such a recipe is refused at load
    (tested), then loaded with the transformers backend to check everything else."""
    raw = yaml.safe_load(path.read_text()) or {}
    if "compare" in raw:
        return load_compare_config(path)[0]
    if raw.get("sampling", {}).get("backend") == "vllm" and not vllm_importable():
        with pytest.raises(ValueError, match="sampling.backend='vllm' needs vLLM"):
            config.load_config(path)
        return config.load_config(path, ["sampling.backend=transformers"])
    return config.load_config(path)


def check_reference(where: str, value: str | None) -> None:
    """A model or dataset reference is a lab name ("lab" for the task, a shipped lab model), a registered real
    model, a hub id owner/name, or a local path that exists."""
    if value is None or value == "lab" or value in LAB_MODELS or value in REAL_MODELS:
        return
    if value.startswith((".", "/", "~")) or "/" not in value or value.count("/") > 1:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else ROOT / path
        assert path.exists(), f"{where}: local path {value!r} does not exist"
    else:
        assert HUB_ID.match(value), f"{where}: {value!r} is not a hub id of the form owner/name"


def test_there_are_recipes_for_the_papers_models_and_one_gpu():
    names = {p.stem for p in (ROOT / "configs" / "recipes").glob("*.yaml")}
    assert {"qwen3-4b-math", "qwen3-4b-code", "olmo3-7b-math", "olmo3-7b-code", "qwen3-0.6b-math"} <= names
    assert {"1gpu", "4gpu-ddp", "8gpu-ddp", "4gpu-fsdp", "8gpu-fsdp"} <= {p.stem for p in ACCELERATE_CONFIGS}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_run_config_loads_validates_and_names_well_formed_references(path):
    cfg = load_config(path)  # refuses unknown keys and values of the wrong type
    where = str(path.relative_to(ROOT))
    check_reference(f"{where}: model", cfg.model)
    data = getattr(cfg, "data", None)
    if data is not None:
        check_reference(f"{where}: data.path", data.path)
        check_reference(f"{where}: data.eval_path", data.eval_path)
    if cfg.task != "lab":
        assert data is not None and (data.path or data.source), f"{where}: task {cfg.task!r} needs data.path or source"
    # Every key written in the file is a field (load_config checked), and the file sets what the header
    # promises: nothing is left silently at a default that differs from the recipe's intent.
    raw = yaml.safe_load(path.read_text())
    assert raw["model"] == cfg.model and raw["task"] == cfg.task


@pytest.mark.parametrize("path", [p for p in RUN_CONFIGS if p.parent.name == "recipes"], ids=lambda p: p.stem)
def test_recipes_follow_the_papers_structure_and_state_their_estimates(path):
    cfg = load_config(path)
    text = path.read_text()
    assert "ESTIMATES" in text and "nothing below was measured" in text
    assert re.search(r"\d+(\.\d+)? GB", text) and re.search(r"\d+(-\d+)? (s|min|h)\b", text)
    assert cfg.collect.answers_per_problem == 1 and cfg.collect.revisions_per_answer == 3
    assert cfg.distill.top_k == 64 and cfg.srt.epochs == 3
    assert cfg.n_phase1 * 3 == cfg.n_phase2 * 2, "the paper's 6K/9K split (2:3)"
    family = "olmo" if "olmo" in cfg.model.lower() else "qwen"
    assert cfg.control_preset == family
    if "0.6b" not in path.stem:
        assert (cfg.srt.lr, cfg.distill.lr, cfg.distill.prompts_per_step, cfg.eval.k) == (5e-6, 5e-6, 128, 8)
    if cfg.task == "math" and "0.6b" not in path.stem:
        assert (cfg.n_phase1, cfg.n_phase2) == (6000, 9000)
    if cfg.task == "code":  # codeforces-cots has about 9.5K distinct problems (solutions_py: one row each)
        assert cfg.data.name == "solutions_py" and cfg.n_phase1 + cfg.n_phase2 + cfg.eval.n_problems <= 9500
    # The teacher reads prompt + y + phrase + y: its limit must hold two full answers.
    assert cfg.distill.teacher_max_length >= 2 * cfg.sampling.max_new_tokens


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_is_one_accelerate_reads(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(path)  # unknown keys and unknown distributed types fail here
    gpus = int(re.match(r"(\d+)gpu", path.stem).group(1))
    assert config.num_processes == gpus and config.num_machines == 1
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}.get(path.stem.partition("-")[2], "NO")
    assert config.distributed_type.value == expected
    # "no" would turn off the bf16 autocast sdzero otherwise uses on GPUs (training.make_accelerator).
    assert config.mixed_precision == "bf16"
    if expected == "FSDP":
        assert set(config.fsdp_config) <= {
            "fsdp_version", "fsdp_auto_wrap_policy", "fsdp_reshard_after_forward", "fsdp_offload_params",
            "fsdp_cpu_ram_efficient_loading", "fsdp_state_dict_type", "fsdp_activation_checkpointing",
            "fsdp_transformer_layer_cls_to_wrap", "fsdp_min_num_params"}
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT", \
            "stage folders are plain save_pretrained folders"
    if expected == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]


@pytest.mark.parametrize("override, message", [
    ("srt.grad_clip=-1", "srt.grad_clip must be > 0, got -1.0"),
    ("srt.warmup_ratio=1", "srt.warmup_ratio must be in [0, 1)"),
    ("distill.warmup_steps=-1", "distill.warmup_steps must be >= 0"),
    ("distill.eval_every=0", "distill.eval_every must be >= 1"),
    ("collect.revisions_per_answer=0", "collect.revisions_per_answer must be >= 1"),
    ("sampling.top_p=0", "sampling.top_p must be in (0, 1]"),
    ("lora.dropout=1", "lora.dropout must be in [0, 1)"),
    ("eval.curve_k=0", "eval.curve_k must be >= 1"),
    ("evolve.sync_every=0", "evolve.sync_every must be >= 1"),
    ("n_phase2=0", "n_phase2 must be >= 1"),
    ("lora.target_modules=[q_proj, 3]", "lora.target_modules: expected"),
    ("task=math", "data.path is required for task 'math'"),
])
def test_settings_out_of_range_are_refused_when_loaded(override, message):
    with pytest.raises(ValueError) as refused:
        config.load_config(None, [override])
    assert message in str(refused.value)


def test_a_bad_value_is_blamed_on_the_layer_that_brought_it(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("srt: {lr: fast}\n")
    with pytest.raises(ValueError, match=r"^.*mine.yaml: srt.lr: expected float"):
        config.load_config(path)
    path.write_text("srt: {lr: 1.0e-4}\n")
    with pytest.raises(ValueError, match=r"^--set distill.top_k=many: distill.top_k: expected"):
        config.load_config(path, ["distill.top_k=many"])
    modules = config.load_config(path, ["lora.target_modules=[q_proj, v_proj]"]).lora.target_modules
    assert modules == ["q_proj", "v_proj"]


# ------------------------------------------------------------------------------------------
# The settings a command uses without --config


def test_without_a_config_each_model_gets_the_settings_made_for_it(tmp_path):
    lab_demo = ROOT / "src" / "sdzero" / "lab" / "demo.yaml"
    for model in (None, "lab", "lab-v2", "lab-control"):
        chosen = config.default_settings(None, model)
        assert chosen.path == lab_demo and chosen.description == f"the lab demo's ({lab_demo})", model
    preset = config.default_settings(None, "smollm2-135m-instruct")
    assert preset.path == ROOT / "src" / "sdzero" / "presets" / "smollm2-135m-instruct.yaml"
    assert preset.description.startswith("preset smollm2-135m-instruct (")
    for model in ("Qwen/Qwen3-0.6B", str(tmp_path / "my_model"), "model.gguf"):
        assert config.default_settings(None, model) == config.Settings(None, "the paper's defaults"), model
    # a stage folder of a run (RUN/srt) gets the settings the run recorded
    run = tmp_path / "run"
    (run / "srt").mkdir(parents=True)
    (run / "config.yaml").write_text("model: lab\n")
    (run / "run.json").write_text("{}")
    assert config.default_settings(None, str(run / "srt")) == config.Settings(run / "config.yaml",
                                                                             f"the run's ({run / 'config.yaml'})")
    # a config file always wins, whatever the model
    mine = tmp_path / "mine.yaml"
    assert config.default_settings(mine, "smollm2-135m-instruct") == config.Settings(mine, str(mine))
    assert config.default_settings(mine, None) == config.Settings(mine, str(mine))


def test_every_registered_preset_is_shipped_and_names_its_model():
    for name, entry in REAL_MODELS.items():
        assert entry.preset is not None, f"{name} would run on the paper's 4B-7B settings"
        path = ROOT / "src" / "sdzero" / "presets" / f"{entry.preset}.yaml"
        assert config.load_config(path).model == name


def test_the_smollm2_preset_is_the_study_setting_at_a_demo_size():
    cfg = config.load_config(config.default_settings(None, "smollm2-135m-instruct").path)
    study, _ = load_compare_config(ROOT / "configs" / "compare_smollm2.yaml")
    assert cfg.task == study.task == "reasoning-gym"
    # the demo runs the study's task, answer rule and sampling, so its figures speak of the same setting
    assert cfg.data == study.data and cfg.sampling == study.sampling and cfg.collect == study.collect
    assert cfg.srt.lr == study.srt.lr
    # Phase 2's rate may only be lower in the study: its 40 steps at the demo's 1e-5 collapsed (docs/real.md)
    assert study.distill.lr <= cfg.distill.lr
    assert cfg.n_phase1 < study.n_phase1 and cfg.distill.max_steps < study.distill.max_steps
    # every field the file sets has a comment saying why (the line itself or the one above it)
    lines = (ROOT / "src" / "sdzero" / "presets" / "smollm2-135m-instruct.yaml").read_text().splitlines()
    assert sum(line.lstrip().startswith("#") for line in lines) >= 12


def test_an_empty_system_prompt_is_no_system_prompt():
    assert config.load_config(None, ["system_prompt=''"]).system_prompt is None
    assert config.load_config(None, ["system_prompt="]).system_prompt is None
    assert config.load_config(None, ["system_prompt=Be brief."]).system_prompt == "Be brief."
