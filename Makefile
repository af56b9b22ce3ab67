# make quickstart — set up and run the quickstart study; make test — set up and run every test (two at a time:
# most wait on processes, a port or a cluster, and each trains on one core);
# make test-fast — the unit tier (trains nothing, under a minute); make lint — ruff's checks and formatting,
# the import contract (lint-imports: no floor of hpo/ imports a higher one) and the size limits (.ci/sizes.py).
PYTHON ?= python3
VENV   ?= .venv
# PyTorch is installed first and pinned here: on our dev and CI machines this version is a CPU
# wheel on local disk; elsewhere pick your build, e.g. make TORCH="torch>=2.4" quickstart.
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin

$(BIN)/hpo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/hpo

quickstart: setup
	$(BIN)/hpo run studies/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q tests/unit

lint: setup
	$(BIN)/ruff check hpo tests benchmarks .ci && $(BIN)/ruff format --check hpo tests benchmarks .ci
	$(BIN)/lint-imports
	$(BIN)/python .ci/sizes.py hpo

.PHONY: setup quickstart test test-fast lint
