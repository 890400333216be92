# Two entry points for a fresh machine: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch lies on the project's machines; GPU users can pass TORCH_SPEC="torch>=2.6".
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: setup browser demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@# bubblewrap is the OS sandbox that model-written code runs in (see docs/sandbox.md)
	command -v bwrap >/dev/null || apt-get install -y -q bubblewrap || \
		(apt-get update -q && apt-get install -y -q bubblewrap) || \
		echo "WARNING: could not install bubblewrap; code rewards will refuse to run model code"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
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
