"""Model cards: every saved checkpoint gets a README.md that says what it is, so the folder can be shared as is.

The card opens with YAML front matter in the Hugging Face Hub's format (base_model, datasets, tags, ...)
followed by a short Markdown description: base model, stage, data, the settings that shaped it and the
evaluation figures when they are known.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

STAGES = {
    "srt": "Phase 1 of SD-Zero: Self-Revision Training (SRT). The model was trained on its own verified "
           "revisions: after its first answer and a control phrase chosen by the verifier's reward, it "
           "rewrites the answer. It answers and can revise its own answers when given the control phrase.",
    "sdzero": "Phase 2 of SD-Zero: on-policy self-distillation. The SRT model, reading its own answer and the "
              "control phrase, was distilled token by token back into the plain generator, which answers "
              "without revising.",
}
TITLES = {"srt": "Phase 1 (SRT)", "sdzero": "Phase 2 (self-distilled)"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """True for "owner/name" hub ids (not for local paths such as ./runs/x or /data/model)."""
    return bool(HUB_ID.match(name)) and not Path(name).exists()


def read_card(path: str | Path) -> dict:
    """The YAML front matter of a checkpoint's README.md ({} when there is none)."""
    readme = Path(path) / "README.md"
    if not readme.exists():
        return {}
    text = readme.read_text()
    if not text.startswith("---\n"):
        return {}
    front, sep, _ = text[4:].partition("\n---\n")
    return (yaml.safe_load(front) or {}) if sep else {}


def write_model_card(path: str | Path, *, base_model: str, stage: str, data: str, settings: dict,
                     evaluation: dict | None = None) -> Path:
    """Write `path`/README.md for a saved checkpoint; returns its path.

    base_model: the model the run started from ("lab", a hub id or a folder). When it is a folder holding
    a card of its own (an SRT checkpoint), the original base model is read from that card.
    stage: "srt" or "sdzero" (other names are written as given). data: where the problems came from.
    settings: the key settings, {name: value}. evaluation: {metric: value}, e.g. {"avg@8": 0.61}.
    """
    path = Path(path)
    parent = read_card(base_model) if not is_hub_id(base_model) else {}
    root = parent.get("sdzero", {}).get("base_model", base_model)
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": list(dict.fromkeys(["sdzero", "self-distillation", stage]))}
    if is_hub_id(root):
        front["base_model"] = root
    if is_hub_id(data):
        front["datasets"] = [data]
    front["sdzero"] = {"stage": stage, "base_model": root, "data": data}

    from sdzero.lab import LAB_MODELS

    shipped = root in LAB_MODELS
    started = f"the sdzero lab base model (`{root}`, shipped with the package)" if shipped else f"`{root}`"
    lines = [f"# {f'sdzero {root} model' if shipped else root}: SD-Zero {TITLES.get(stage, stage)}", "",
             STAGES.get(stage, f"Stage: {stage}."), "",
             f"- **Base model:** {started}"]
    if parent:
        lines.append(f"- **Initialised from:** `{base_model}` ({parent.get('sdzero', {}).get('stage', 'a checkpoint')})")
    lines += [f"- **Stage:** {stage}", f"- **Data:** {data}", "",
              "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{key}` | `{value}` |" for key, value in settings.items()]
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |"
                  for key, value in evaluation.items()]
    else:
        lines.append("Not evaluated when this checkpoint was saved (`sdzero eval --model <this folder>`).")
    lines += ["", "## Use", "",
              "A plain `save_pretrained` folder: it loads in transformers or vLLM as it is.", "",
              "```python no-run",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")",
              "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")",
              "```", "",
              "Trained with [sdzero](https://pypi.org/project/sdzero/), an implementation of SD-Zero "
              "(He et al., *Self-Distillation Zero: Self-Revision Turns Binary Rewards into Dense Supervision*, "
              "arXiv 2604.12002).", ""]
    readme = path / "README.md"
    path.mkdir(parents=True, exist_ok=True)
    readme.write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(lines))
    return readme


def run_card_fields(cfg, stage: str) -> dict:
    """`data` and `settings` for a card, read from a RunConfig: the fields that shaped `stage`."""
    data_cfg = getattr(cfg, "data", None)
    source = getattr(data_cfg, "path", None) if data_cfg is not None else None
    if cfg.task == "lab" and not source:
        data = "the built-in lab task (sdzero.lab)"
    else:
        data = source or cfg.task
    phrases = cfg.phrases()
    settings = {"task": cfg.task, "control_correct": phrases.correct, "control_wrong": phrases.wrong,
                "seed": cfg.seed, "sampling.temperature": cfg.sampling.temperature,
                "sampling.max_new_tokens": cfg.sampling.max_new_tokens}
    if stage == "srt":
        settings.update({"n_phase1": cfg.n_phase1, **_prefixed("collect", cfg.collect), **_prefixed("srt", cfg.srt)})
    elif stage == "sdzero":
        settings.update({"n_phase2": cfg.n_phase2, **_prefixed("distill", cfg.distill)})
    return {"data": data, "settings": settings}


def _prefixed(name: str, section) -> dict:
    return {f"{name}.{key}": value for key, value in vars(section).items()}


def evaluation_figures(report: dict) -> dict:
    """{metric: value} for a card from an `sdzero.evaluate.evaluate` report."""
    n = report.get("n_problems")
    figures = {f"{report['metric']} ({n} held-out problems)" if n else report["metric"]: report["accuracy"]}
    figures.update({key: value for key, value in report.items() if key.startswith("pass@")})
    figures["mean answer length (tokens)"] = report["mean_length"]
    return figures
