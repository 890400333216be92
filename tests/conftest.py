"""Shared fixtures: the shipped lab model and tokenizer (real transformers objects, built by this
project, loaded from the repository; nothing is downloaded)."""

import importlib.util
import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))  # 1 on a machine shared with another job


@pytest.fixture(scope="session")
def lab_model_and_tokenizer():
    from sdzero.pipeline import load_model

    return load_model("lab", device="cpu")


@pytest.fixture(scope="session")
def lab_tokenizer(lab_model_and_tokenizer):
    return lab_model_and_tokenizer[1]

# tests/with_vllm runs the vLLM backend against the real engine, in the venv `make test-vllm` builds (vLLM's CPU
# build pins another transformers than the main venv's). Where vLLM is not installed it is not collected.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["with_vllm"]
