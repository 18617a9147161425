# taso-bench: `make run` sets up and runs the default experiment; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
DATA_DIR ?= ../shared/data/glue
RUNS ?= runs
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test clean

# torch is pinned to the CPU build before anything can pull a CUDA one (users with a GPU:
# install their CUDA torch first, `make setup` keeps it).
$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(BIN)/activate

setup: $(BIN)/activate

run: setup
	$(PY) run.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
