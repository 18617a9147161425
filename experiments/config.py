"""Structured (typed) configuration of a run.

Every group of ``conf/`` is backed by a dataclass registered in Hydra's ConfigStore, so a
misspelled key (``trainer.lr_rate=...``) fails at composition with the name of the unknown
key instead of being silently ignored. Method options are registered by each method next to
its implementation (see :mod:`experiments.methods`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from experiments.methods import load_methods
from experiments.precision import Precision
from experiments.storage import overrides_hash

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class PromptFormat(str, Enum):
    """The prompt a causal LM reads (:mod:`experiments.causal`)."""

    llm_adapters = "llm_adapters"  # LLM-Adapters' Alpaca instruction, "the correct answer is <key>"
    lm_eval = "lm_eval"  # lm-evaluation-harness's prompt and choice texts (the task's lm_eval block)


@dataclass
class TaskConfig:
    """A downstream task described as data (lm-evaluation-harness style).

    ``label_names`` empty means regression (one output, e.g. STS-B scores).
    """

    name: str = MISSING
    suite: str = "glue"
    task_type: str = "seq_cls"  # seq_cls | multiple_choice (a causal model scores choices either way)
    hub_path: str = "nyu-mll/glue"
    hub_config: str = MISSING  # "default" for hub datasets without named configurations
    local_name: str = MISSING  # folder name inside data.dir (GLUE's "RTE", "STS-B", ...)
    text_fields: list[str] = field(default_factory=list)  # hub / parquet column names
    label_field: str = "label"
    label_names: list[str] = field(default_factory=list)
    metric: str = "accuracy"  # headline metric, reported as metrics.main
    train_split: str = "train"
    eval_split: str = "validation"
    # further evaluation splits -> suffix of their metrics (MNLI: {validation_mismatched: mm}
    # gives accuracy_mm); evaluated once, after training
    extra_eval_splits: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # split -> file in <data.dir>/<local_name>/ (default: GLUE's)
    tsv: dict[str, Any] = field(default_factory=dict)  # layout of the original GLUE TSV files
    mc_columns: dict[str, Any] = field(default_factory=dict)  # multiple choice: hub columns (experiments.data)
    # multiple choice, encoder: the context holds this blank; each choice fills it (WinoGrande)
    blank: Optional[str] = None
    instruction: dict[str, Any] = field(default_factory=dict)  # causal LM: intro, choice_word (experiments.causal)
    prompt_format: PromptFormat = PromptFormat.llm_adapters  # causal LM: llm_adapters | lm_eval
    lm_eval: dict[str, Any] = field(default_factory=dict)  # causal LM: lm-eval's template (experiments.prompts)
    mix: list[str] = field(default_factory=list)  # causal LM: train on these tasks together, evaluate each
    max_length: int = 128  # tokens; longer inputs fail the run (with their count) before training...
    allow_truncation: bool = False  # ...unless this is true: then they are cut, and results.json counts them
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None


@dataclass
class BudgetConfig:
    """Trainable-parameter budget: the count of LoRA with rank ``rank`` on the target modules."""

    name: str = MISSING
    rank: int = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    kind: str = "encoder"  # encoder (a task head) | causal_lm (choices scored by log-likelihood)
    source: str = "hub"  # hub | package | cache | random
    path: Optional[str] = None  # hub id or local folder
    package: Optional[str] = None  # python package that ships the weights (source=package)
    package_subdir: str = "model"
    # source=cache: built once into the user cache by experiments.model_cache
    builder: Optional[str] = None  # mpnet_parts | gguf
    parts: list[str] = field(default_factory=list)  # "<distribution>:<file>" of each split-zip part
    gguf: Optional[str] = None  # "<distribution>:<file>" of a GGUF checkpoint
    cache_dir: Optional[str] = None  # None: $TASO_BENCH_CACHE or ~/.cache/taso-bench/models
    tokenizer: Optional[str] = None  # defaults to the model's own; "package:<pkg>" allowed
    special_tokens: dict[str, str] = field(default_factory=dict)  # e.g. {eos_token: "[SEP]"} for a borrowed tokenizer
    target_modules: list[str] = field(default_factory=list)
    head_modules: list[str] = field(default_factory=lambda: ["classifier"])
    architecture: dict[str, Any] = field(default_factory=dict)  # for source=random
    trust_remote_code: bool = False
    # a finished run folder saved with trainer.save_model=true: start from its fine-tuned
    # weights (model/ inside it) instead of the pretrained ones; a head whose label count
    # differs is re-initialised
    init_from: Optional[str] = None


@dataclass
class TrainerConfig:
    epochs: float = 3.0
    max_steps: int = -1
    lr: Optional[float] = None  # None: the method's own default learning rate
    batch_size: int = 32
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1  # optimizer step every this many batches
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    eval_strategy: str = "epoch"  # epoch | steps | no (a final evaluation always runs)
    eval_steps: Optional[int] = None
    save_strategy: str = "epoch"  # checkpoints for resuming a killed run: epoch | steps | no
    save_steps: Optional[int] = None  # with save_strategy=steps
    keep_checkpoints: bool = False  # delete checkpoints once the run completed
    save_model: bool = False  # write the fine-tuned model (adapters merged) to <run>/model/
    precision: Precision = Precision.auto  # auto | fp32 | bf16 | fp16 (experiments.precision)
    use_cpu: bool = False  # train on the CPU even when a GPU is present
    # batches of similar lengths (less padding); the order is a function of (seed, epoch) alone,
    # the same for every method (experiments.training.SeededLengthGroupedSampler)
    group_by_length: bool = True
    sort_eval_by_length: bool = True  # longest first; the metrics are those of any order
    dataloader_num_workers: int = 0
    progress_bar: bool = True
    stop_on_nonfinite: bool = True  # a NaN / inf loss ends the run with status "diverged"
    num_threads: Optional[int] = None  # torch CPU threads; None: all cores, or cores / n_jobs under joblib


@dataclass
class LoggerConfig:
    name: str = "none"  # wandb | none
    project: str = "taso-bench"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None  # None: the sweep's id in a multirun, else none
    tags: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    dir: Optional[str] = None  # local folder with the task files; None: datasets.load_dataset
    cache_dir: Optional[str] = None


@dataclass
class PathsConfig:
    runs: str = "runs"


@dataclass
class RunConfig:
    method: Any = MISSING
    task: TaskConfig = MISSING
    budget: BudgetConfig = MISSING
    model: ModelConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    data: DataConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0


def register_configs() -> None:
    """Store the schemas (group ``schema/<group>``, so they never show up as choices);
    each YAML of a group extends its schema through its defaults list. Methods store their
    own schemas (``schema/method/<name>``) when they are registered."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, node in (
        ("task", TaskConfig),
        ("budget", BudgetConfig),
        ("model", ModelConfig),
        ("trainer", TrainerConfig),
        ("logger", LoggerConfig),
        ("data", DataConfig),
    ):
        cs.store(group=f"schema/{group}", name=group, node=node)
    if not OmegaConf.has_resolver("run_suffix"):
        OmegaConf.register_new_resolver("run_suffix", overrides_hash)
    load_methods()


def task_config(name: str) -> DictConfig:
    """``conf/task/<name>.yaml`` on its schema, outside a composition (mixture members)."""
    path = CONF_DIR / "task" / f"{name}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ValueError(f"unknown task {name!r} in task.mix; valid: {valid}")
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    return OmegaConf.merge(OmegaConf.structured(TaskConfig), raw)


def compose(overrides: Optional[list[str]] = None) -> DictConfig:
    """The run config for ``overrides``, composed as ``run.py`` would (for tests, notebooks)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides or []))
