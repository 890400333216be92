"""Shared fixtures: the shipped lab model and tokenizer (real transformers objects, built by this
project, loaded from the repository; nothing is downloaded)."""

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
