# taso-bench: `make run` sets up and runs the default experiment (on the GLUE files in
# DATA_DIR when that folder exists, else from the hub); `make test` runs the tests.
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
	$(PY) run.py $(if $(wildcard $(DATA_DIR)),data.dir=$(DATA_DIR)) $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# --- TASO ablation: the readings of what the paper leaves open (docs/taso.md) ------------
# PROFILE=full: 3 epochs on the whole training sets. PROFILE=quick: 3 epochs on 256
# training examples and 8 importance batches (what a busy 2-core machine finishes in about
# an hour). Seeds are the outer loop, so a partial run already covers every variant.
PROFILE ?= full
SEEDS ?= 0 1 2
ABLATION_RUNS ?= $(RUNS)/taso_ablation_$(PROFILE)
ABLATION_quick := task.max_train_samples=256 trainer.eval_strategy=no trainer.save_strategy=no
ABLATION_full :=
TASO_quick := method.importance_batches=8
TASO_full :=
ABLATION = $(PY) run.py -m task=rte,mrpc seed=$$seed model=minilm logger=none data.dir=$(DATA_DIR) \
	paths.runs=$(ABLATION_RUNS) $(ABLATION_$(PROFILE))

.PHONY: taso-ablation
taso-ablation: setup
	for seed in $(SEEDS); do \
	  $(ABLATION) method=lora && \
	  $(ABLATION) method=taso $(TASO_$(PROFILE)) method.scope=per_matrix method.lr_gamma=0,0.5,1 && \
	  $(ABLATION) method=taso $(TASO_$(PROFILE)) method.scope=global method.lr_gamma=0.5 || exit 1; \
	done
	$(PY) -m analysis.ablation --runs $(ABLATION_RUNS) --out docs/taso_ablation_$(PROFILE).md

# --- speed: every registered method's training step as a ratio to BitFit's (same batches) --
BENCH_ARGS ?=
.PHONY: bench
bench: setup
	$(PY) -m experiments.bench $(BENCH_ARGS)
