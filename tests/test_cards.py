"""Model cards: every saved stage folder carries a README.md with valid front matter and the run's facts."""

import pytest
import yaml
from transformers import AutoModelForCausalLM

from sdzero.cards import is_hub_id, read_card, write_model_card
from sdzero.cli import DEMO_CONFIG, main
from sdzero.config import load_config
from sdzero.pipeline import save_stage


def front_matter_and_body(folder):
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    front, sep, body = text[4:].partition("\n---\n")
    assert sep, "front matter is not closed"
    return yaml.safe_load(front), body


def test_saved_stages_carry_cards_that_chain_to_the_base_model(tmp_path, lab_model_and_tokenizer):
    model, tokenizer = lab_model_and_tokenizer
    # A hub id as the configured base model: nothing is downloaded, only the card's text uses it.
    cfg = load_config(overrides=["model=Qwen/Qwen3-4B-Instruct-2507", "task=math", "data.path=problems.jsonl",
                                 "control_preset=qwen", "srt.lr=5e-6", "distill.top_k=64"])
    report = {"metric": "avg@8", "k": 8, "n_problems": 500, "accuracy": 0.5625, "mean_length": 812.5,
              "pass@1": 0.5625, "pass@8": 0.75}
    save_stage(model, tokenizer, tmp_path / "srt", cfg, "srt", report)

    front, body = front_matter_and_body(tmp_path / "srt")
    assert front["base_model"] == "Qwen/Qwen3-4B-Instruct-2507"
    assert front["library_name"] == "transformers" and "sdzero" in front["tags"] and "srt" in front["tags"]
    assert front["sdzero"]["stage"] == "srt"
    assert "Self-Revision Training" in body
    assert "| `srt.lr` | `5e-06` |" in body
    assert "| `control_wrong` | `Wait, this response is wrong. Let me correct it.` |" in body
    assert "| avg@8 (500 held-out problems) | 0.5625 |" in body and "| pass@8 | 0.7500 |" in body
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "srt").config.vocab_size == model.config.vocab_size

    # Phase 2 starts from the SRT folder: its card names the original base model and the folder it came from.
    cfg.model = str(tmp_path / "srt")
    save_stage(model, tokenizer, tmp_path / "sdzero", cfg, "sdzero")
    front, body = front_matter_and_body(tmp_path / "sdzero")
    assert front["base_model"] == "Qwen/Qwen3-4B-Instruct-2507"
    assert read_card(tmp_path / "sdzero")["sdzero"]["stage"] == "sdzero"
    assert f"**Initialised from:** `{tmp_path / 'srt'}` (srt)" in body
    assert "| `distill.top_k` | `64` |" in body and "srt.lr" not in body
    assert "Not evaluated" in body


def test_local_base_model_and_dataset_stay_out_of_hub_metadata(tmp_path):
    write_model_card(tmp_path, base_model="/data/my-model", stage="srt", data="./problems.jsonl",
                     settings={"srt.lr": 1e-5})
    front, body = front_matter_and_body(tmp_path)
    assert "base_model" not in front and "datasets" not in front
    assert front["sdzero"] == {"stage": "srt", "base_model": "/data/my-model", "data": "./problems.jsonl"}
    assert "- **Data:** ./problems.jsonl" in body


def test_hub_ids_are_told_from_paths(tmp_path):
    assert is_hub_id("open-r1/OpenR1-Math-220k") and is_hub_id("allenai/Olmo-3-7B-Instruct")
    assert not is_hub_id("./runs/x") and not is_hub_id("/abs/path") and not is_hub_id("lab")
    assert not is_hub_id("a/b/c")


@pytest.mark.slow
def test_command_line_stages_write_cards(tmp_path):
    tiny = ["--limit", "24", "--quiet", "--max-new-tokens", "100", "--set", "srt.epochs=1",
            "--set", "distill.prompts_per_step=4", "--set", "distill.micro_batch_size=4"]
    assert main(["collect", "--out", str(tmp_path), *tiny]) == 0
    assert main(["srt", "--out", str(tmp_path), *tiny]) == 0
    assert main(["distill", "--out", str(tmp_path), "--max-steps", "1", *tiny]) == 0
    for stage in ("srt", "sdzero"):
        front, body = front_matter_and_body(tmp_path / stage)
        assert front["sdzero"]["stage"] == stage and front["sdzero"]["base_model"] == load_config(DEMO_CONFIG).model
        assert "the built-in lab task" in body
