"""Structured (typed) configuration of a run.

Every group of ``conf/`` is backed by a dataclass registered in Hydra's ConfigStore, so a
misspelled key (``trainer.lr_rate=...``) fails at composition with the name of the unknown
key instead of being silently ignored. Every enumerated option is an Enum field, so a value
outside it (``model.kind=causal``) fails at composition too, naming the key and the valid
values; every numeric option with a valid range carries it (:func:`bounded`), checked by
:func:`check_config` (called by :func:`compose` and first thing in ``runner.run``) before any
model or data loads. Method options are registered by each method next to its implementation
(see :mod:`experiments.methods`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from transformers import SchedulerType

from experiments.methods import METHODS, load_methods
from experiments.metrics import METRICS
from experiments.precision import Precision
from experiments.protocol import protocol_value
from experiments.selection import Rule, Stage
from experiments.storage import folder_name, overrides_hash, suffix_exclusions

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# enumerated options (member name == value, so OmegaConf accepts and lists the values)
Suite = StrEnum("Suite", ["glue", "commonsense"])
TaskType = StrEnum("TaskType", ["seq_cls", "multiple_choice"])  # a causal model scores choices either way
Metric = StrEnum("Metric", list(METRICS))  # the headline metric, experiments.metrics
ModelKind = StrEnum("ModelKind", ["encoder", "causal_lm"])  # a task head | choices scored by log-likelihood
ModelSource = StrEnum("ModelSource", ["hub", "package", "cache", "random"])
CacheBuilder = StrEnum("CacheBuilder", ["mpnet_parts", "gguf"])  # experiments.model_cache.BUILDERS
Schedule = StrEnum("Schedule", ["epoch", "steps", "no"])  # evaluation / checkpoint schedule
LrScheduler = StrEnum("LrScheduler", [s.value for s in SchedulerType])  # transformers' schedulers
LoggerName = StrEnum("LoggerName", ["wandb", "none"])
LoggerMode = StrEnum("LoggerMode", ["offline", "online", "disabled"])


class ConfigError(ValueError):
    """An option value outside its valid range, found before anything loads."""


@dataclass(frozen=True)
class Bound:
    """A numeric range: ``low`` (<, or <= when ``low_open``) value (<, or <= when not ``high_open``) ``high``."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def bounded(default: Any, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Any:
    """A dataclass field whose value (when not None) must lie in the range (:class:`Bound`)."""
    return field(default=default, metadata={"bound": Bound(low, high, low_open, high_open)})


# the prompt a causal LM reads (experiments.causal): LLM-Adapters' Alpaca instruction with "the
# correct answer is <key>" | lm-evaluation-harness's prompt and choice texts (the task's lm_eval block)
PromptFormat = StrEnum("PromptFormat", ["llm_adapters", "lm_eval"])


@dataclass
class TsvLayout:
    """Where a task's fields sit in its original GLUE TSV files (``experiments.data.read_glue_tsv``)."""

    header: bool = True  # the first line names the columns
    n_columns: Optional[int] = None  # without a header: the column count of every row
    text_columns: list[Any] = field(default_factory=list)  # header names, or 0-based indices without a header
    label_column: Any = None  # a header name, or a 0-based index without a header


@dataclass
class ChoiceColumns:
    """How a multiple-choice row is read from the hub's columns (``experiments.data.multiple_choice_columns``);
    a dotted name (``choices.text``) reads a key of a struct column."""

    context: list[str] = field(default_factory=list)  # columns joined by a space
    choices: list[str] = field(default_factory=list)  # one column per choice...
    choices_list: Optional[str] = None  # ...or one column holding the list of choices
    label: str = "label"  # the answer's column
    label_base: int = 0  # the answer's first value (1 for SIQA's "1".."3")
    label_keys: Optional[str] = None  # a column of keys the answer is one of (ARC's "A".."E")
    keep: list[str] = field(default_factory=list)  # further columns copied where present (lm-eval's prompts)


@dataclass
class InstructionTemplate:
    """LLM-Adapters' instruction, built for hub rows in the causal-LM mode (``experiments.causal``)."""

    intro: Optional[str] = None  # "Please choose the correct answer to the question"
    choice_word: Optional[str] = None  # the answer keys' word: Answer -> answer1, answer2...


Cleaner = StrEnum("Cleaner", ["wikihow"])  # lm-eval's text preprocessing (experiments.prompts.CLEANERS)


@dataclass
class LmEvalTemplate:
    """lm-evaluation-harness's zero-shot prompt of a task (``task.prompt_format=lm_eval``, ``experiments.prompts``)."""

    text: Optional[str] = None  # the context, formatted with the row's fields
    choices: list[str] = field(default_factory=list)  # fixed choice texts (BoolQ's no/yes); empty: the row's
    capitalize: list[str] = field(default_factory=list)  # fields capitalised first (HellaSwag's ctx_b)
    clean: Optional[Cleaner] = None  # preprocessing of the context and every choice
    delimiter: str = " "  # between the context and a choice
    partial: bool = False  # WinoGrande: each choice fills the blank, the rest of the sentence is scored
    required: list[str] = field(default_factory=list)  # fields that must be non-empty (BoolQ's passage)


@dataclass
class TaskConfig:
    """A downstream task described as data (lm-evaluation-harness style).

    ``label_names`` empty means regression (one output, e.g. STS-B scores).
    """

    name: str = MISSING
    suite: Suite = Suite.glue
    task_type: TaskType = TaskType.seq_cls
    hub_path: str = "nyu-mll/glue"
    hub_config: str = MISSING  # "default" for hub datasets without named configurations
    local_name: str = MISSING  # folder name inside data.dir (GLUE's "RTE", "STS-B", ...)
    text_fields: list[str] = field(default_factory=list)  # hub / parquet column names
    label_field: str = "label"
    label_names: list[str] = field(default_factory=list)
    metric: Metric = Metric.accuracy  # headline metric, reported as metrics.main
    train_split: str = "train"
    eval_split: str = "validation"
    # further evaluation splits -> suffix of their metrics (MNLI: {validation_mismatched: mm}
    # gives accuracy_mm); evaluated once, after training
    extra_eval_splits: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # split -> file in <data.dir>/<local_name>/ (default: GLUE's)
    tsv: TsvLayout = field(default_factory=TsvLayout)  # layout of the original GLUE TSV files
    mc_columns: ChoiceColumns = field(default_factory=ChoiceColumns)  # multiple choice: hub columns
    # multiple choice, encoder: the context holds this blank; each choice fills it (WinoGrande)
    blank: Optional[str] = None
    instruction: InstructionTemplate = field(default_factory=InstructionTemplate)  # causal LM: LLM-Adapters prompt
    prompt_format: PromptFormat = PromptFormat.llm_adapters  # causal LM: llm_adapters | lm_eval
    lm_eval: LmEvalTemplate = field(default_factory=LmEvalTemplate)  # causal LM: lm-eval's prompt
    mix: list[str] = field(default_factory=list)  # causal LM: train on these tasks together, evaluate each
    max_length: int = bounded(128, 1)  # tokens; longer inputs fail the run (with their count) before training...
    allow_truncation: bool = False  # ...unless this is true: then they are cut, and results.json counts them
    max_train_samples: Optional[int] = bounded(None, 1)
    max_eval_samples: Optional[int] = bounded(None, 1)


@dataclass
class BudgetConfig:
    """Trainable-parameter budget: the count of LoRA with rank ``rank`` on the target modules."""

    name: str = MISSING
    rank: int = bounded(MISSING, 1)


@dataclass
class ModelConfig:
    name: str = MISSING
    kind: ModelKind = ModelKind.encoder
    source: ModelSource = ModelSource.hub
    path: Optional[str] = None  # hub id or local folder
    package: Optional[str] = None  # python package that ships the weights (source=package)
    package_subdir: str = "model"
    # source=cache: built once into the user cache by experiments.model_cache
    builder: Optional[CacheBuilder] = None
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
    epochs: float = bounded(3.0, 0)  # > 0 unless max_steps > 0 (check_config)
    max_steps: int = bounded(-1, -1)  # > 0 overrides epochs
    lr: Optional[float] = bounded(None, 0, low_open=True)  # None: the method's own default learning rate
    batch_size: int = bounded(32, 1)
    eval_batch_size: int = bounded(64, 1)
    gradient_accumulation_steps: int = bounded(1, 1)  # optimizer step every this many batches
    weight_decay: float = bounded(0.0, 0)
    warmup_ratio: float = bounded(0.06, 0, 1, high_open=True)
    lr_scheduler: LrScheduler = LrScheduler.linear
    max_grad_norm: float = bounded(1.0, 0)  # 0: no clipping
    logging_steps: int = bounded(10, 1)
    eval_strategy: Schedule = Schedule.epoch  # a final evaluation always runs
    eval_steps: Optional[int] = bounded(None, 1)  # with eval_strategy=steps
    save_strategy: Schedule = Schedule.epoch  # checkpoints for resuming a killed run
    save_steps: Optional[int] = bounded(None, 1)  # with save_strategy=steps
    keep_checkpoints: bool = False  # delete checkpoints once the run completed
    save_model: bool = False  # write the fine-tuned model (adapters merged) to <run>/model/
    precision: Precision = Precision.auto  # auto | fp32 | bf16 | fp16 (experiments.precision)
    use_cpu: bool = False  # train on the CPU even when a GPU is present
    # batches of similar lengths (less padding); the order is a function of (seed, epoch) alone,
    # the same for every method (experiments.training.SeededLengthGroupedSampler)
    group_by_length: bool = True
    sort_eval_by_length: bool = True  # longest first; the metrics are those of any order
    dataloader_num_workers: int = bounded(0, 0)
    progress_bar: bool = True
    stop_on_nonfinite: bool = True  # a NaN / inf loss ends the run with status "diverged"
    num_threads: Optional[int] = bounded(None, 1)  # torch CPU threads; None: all cores, or cores / n_jobs under joblib


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    project: str = "taso-bench"
    entity: Optional[str] = None
    mode: LoggerMode = LoggerMode.offline
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
class ProtocolEntry:
    """Training values of a protocol, for one task or for all (``None``: not set there)."""

    epochs: Optional[float] = None
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    max_length: Optional[int] = None
    warmup_ratio: Optional[float] = None
    weight_decay: Optional[float] = None


@dataclass
class ProtocolConfig:
    """A training recipe (``conf/protocol/<name>.yaml``): values for every task (``shared``)
    and per task (``per_task``, which wins), read by the ``${protocol:<key>}`` resolver
    (:func:`experiments.protocol.protocol_value`) into ``trainer`` and ``task`` keys.
    ``published_for`` names the method the paper tuned its rates for (``null``: none)."""

    name: str = "default"
    source: str = ""
    published_for: Optional[str] = None
    shared: ProtocolEntry = field(default_factory=ProtocolEntry)
    per_task: dict[str, ProtocolEntry] = field(default_factory=dict)


@dataclass
class SelectionConfig:
    """Learning-rate selection (experiments.selection). ``stage: select`` carves a seeded,
    label-stratified validation slice (``holdout_fraction`` of the training set, the same
    slice for every seed and method) and trains on the rest; ``stage: final`` trains on the
    whole training set and reports on the official dev set. The run's rate is the base rate
    (``trainer.lr``, else the method's) times ``lr_factor``: a study sweeps the factor
    (conf/experiment/*_select.yaml: 1x, 4x, 16x), so each method's grid is log-spaced
    around its own default; ``from_runs`` (a folder of
    selection runs) makes a final run take the factor chosen there by ``rule``: ``holdout``
    (the slice's score, honest) or ``dev`` (the official dev score: peeks at the test data
    the table reports, for comparison only). ``extend_edges``: a final run refuses a factor at
    the edge of those tried until the selection run one grid step past it has run
    (:func:`experiments.selection.owed_factor`)."""

    stage: Stage = Stage.final
    rule: Rule = Rule.holdout
    lr_factor: float = 1.0
    holdout_fraction: float = 0.1
    holdout_seed: int = 0
    from_runs: Optional[str] = None
    extend_edges: bool = False


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
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    seed: int = bounded(0, 0)
    wait_for_lock: bool = False  # a run folder in use by another process: wait for it (else fail at once)


# the schema of each group whose fields carry ranges
SCHEMAS = {"task": TaskConfig, "budget": BudgetConfig, "model": ModelConfig, "trainer": TrainerConfig}


def out_of_range(prefix: str, schema: type, node: Any) -> list[str]:
    """``key=value: must be <range>`` for every field of ``node`` outside its :func:`bounded` range."""
    problems = []
    for spec in fields(schema):
        bound = spec.metadata.get("bound")
        value = node[spec.name]
        if bound is not None and value is not None and not bound.holds(value):
            problems.append(f"{prefix}{spec.name}={value}: must be {bound}")
    return problems


def check_config(cfg: Any) -> None:
    """Every numeric option inside its range and the options that go together, before anything
    loads; raises :class:`ConfigError` naming each offending key, its value and the valid range."""
    problems = out_of_range("", RunConfig, cfg)
    for group, schema in SCHEMAS.items():
        problems += out_of_range(f"{group}.", schema, cfg[group])
    for key in ("task.name", "model.name", "method.name", "budget.name"):
        try:
            folder_name(OmegaConf.select(cfg, key))
        except ValueError as error:
            problems.append(f"{key}: {error}")
    t = cfg.trainer
    if t.max_steps <= 0 and t.epochs <= 0:
        problems.append(f"trainer.epochs={t.epochs} and trainer.max_steps={t.max_steps}: one of them must be > 0")
    trains = METHODS[cfg.method.name].trains if cfg.method.name in METHODS else True
    if trains and t.lr is None and (cfg.method.get("lr") or 0) <= 0:
        problems.append(f"method.lr={cfg.method.get('lr')}: must be > 0 (or set trainer.lr)")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


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
        ("protocol", ProtocolConfig),
    ):
        cs.store(group=f"schema/{group}", name=group, node=node)
    if not OmegaConf.has_resolver("run_suffix"):
        OmegaConf.register_new_resolver("run_suffix", overrides_hash)
        OmegaConf.register_new_resolver("folder", folder_name)
        OmegaConf.register_new_resolver("suffix_exclusions", suffix_exclusions)
    if not OmegaConf.has_resolver("protocol"):
        OmegaConf.register_new_resolver("protocol", protocol_value)
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
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    check_config(cfg)
    return cfg
