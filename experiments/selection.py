"""Learning-rate selection without peeking at the reported data, and the best-epoch metric.

Every run's rate is a base rate (``trainer.lr``, else the method's default) times
``selection.lr_factor``; a study's selection stage sweeps the factor over a log-spaced grid
(conf/experiment/glue_minilm_cpu_select.yaml: 1x, 4x, 16x), so each method's grid is anchored
on its own default. Two stages:

- ``selection.stage=select`` with ``rule=holdout`` (the default rule) carves a validation
  slice from the training set (:func:`holdout_split`: seeded by ``holdout_seed``, stratified
  by label for classification, the same slice for every seed and method), trains on the rest
  and scores the slice; with ``rule=dev`` it trains on everything and scores the official
  dev set ("best on dev", which peeks at the data the table reports).
- ``selection.stage=final`` with ``selection.from_runs=<folder of selection runs>`` takes the
  factor whose selection runs (same model, task, method options, budget, protocol and rule)
  scored best at their final epoch, trains on the full training set and reports on the dev set.

A best factor at the edge of the grid may not be the best rate: the optimum can lie past it.
With ``selection.extend_edges`` (the published study's setting) a final run refuses such a
choice until the selection run one grid step further has run (1x of 1x, 4x, 16x owes 0.25x),
and so on until the best lies inside the factors tried. What is owed, as the overrides of the
runs to add (one per line, for ``python run.py``), :mod:`experiments.edges`::

    python -m experiments.edges experiment=glue_minilm_cpu_select task=stsb method=lora,taso

A final run records the rate it trained at; a finished one whose selection now chooses another
factor runs again (:func:`experiments.storage.stale_provenance`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import datasets
from omegaconf import OmegaConf
from sklearn.model_selection import train_test_split

from experiments.metrics import metric_values
from experiments.storage import CONFIG, RESULTS, identity_config, read_results

HOLDOUT_SPLIT = "train_holdout"  # the eval split name recorded for a holdout selection run


class Stage(str, Enum):
    final = "final"
    select = "select"


class Rule(str, Enum):
    holdout = "holdout"
    dev = "dev"


@dataclass(frozen=True)
class LearningRate:
    """A run's rate: ``base`` x ``factor``; ``candidates`` counts the factors compared
    when the factor was chosen from selection runs (0 when given)."""

    base: float
    factor: float
    candidates: int = 0

    @property
    def lr(self) -> float:
        return self.base * self.factor


def holdout_split(ds: datasets.Dataset, fraction: float, seed: int, label_field: str, stratify: bool) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, slice): ``fraction`` of ``ds``'s rows in the slice, drawn with ``seed``,
    stratified by ``label_field`` when ``stratify`` (classification)."""
    if not 0 < fraction < 1:
        raise ValueError(f"selection.holdout_fraction must be in (0, 1), got {fraction}")
    labels = ds[label_field] if stratify else None
    rest, held = train_test_split(list(range(len(ds))), test_size=fraction, random_state=seed, stratify=labels)
    return ds.select(sorted(rest)), ds.select(sorted(held))


def carves_holdout(cfg: Any) -> bool:
    """True for a selection run scored on a slice of the training set (rule holdout)."""
    return Stage(cfg.selection.stage) is Stage.select and Rule(cfg.selection.rule) is Rule.holdout


def stage_data(cfg: Any, train: datasets.Dataset, dev: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training rows, evaluation rows) of the run's selection stage: the rest and the slice
    of the training set for a holdout selection run, else ``train`` and ``dev`` unchanged."""
    if carves_holdout(cfg):
        sel = cfg.selection
        return holdout_split(train, sel.holdout_fraction, sel.holdout_seed, cfg.task.label_field, bool(cfg.task.label_names))
    return train, dev


def base_rate(cfg: Any) -> float:
    return float(cfg.trainer.lr if cfg.trainer.lr is not None else cfg.method.lr)


def learning_rate(cfg: Any) -> LearningRate:
    """The run's rate: the factor given (``selection.lr_factor``) or, for a final run with
    ``selection.from_runs``, the one chosen there (:func:`chosen_factor`). A base rate of 0
    (a method that trains nothing, method=zero_shot) has no factor to choose: 1x."""
    sel, base = cfg.selection, base_rate(cfg)
    if base == 0:
        return LearningRate(0.0, 1.0)
    if sel.from_runs is None:
        return LearningRate(base, float(sel.lr_factor))
    if Stage(sel.stage) is not Stage.final:
        raise ValueError("selection.from_runs is for final runs (selection.stage=final)")
    factor, candidates = chosen_factor(cfg, Path(sel.from_runs))
    return LearningRate(base, factor, candidates)


def same_setup(record: dict[str, Any], run_config: Any, rule: str, setup: dict[str, Any]) -> bool:
    """True when a completed selection run (its record and config) was made by ``rule`` and its
    config has ``setup`` (:func:`setup_of` of the final run's config: everything its identity
    counts but the seed and the selection settings)."""
    sel = record.get("selection") or {}
    return (
        record.get("status") == "completed"
        and sel.get("stage") == Stage.select.value
        and sel.get("rule") == rule
        and setup_of(run_config) == setup
    )


def setup_of(cfg: Any) -> dict[str, Any]:
    """What :func:`same_setup` compares: the identity's config (:func:`experiments.storage.identity_config`:
    method, model, task, protocol, the resolved trainer and task settings, ...) less ``seed``
    and ``selection`` (stage, factor, where runs lie)."""
    return {k: v for k, v in identity_config(cfg).items() if k not in ("seed", "selection")}


def factor_scores(cfg: Any, folder: Path) -> dict[float, float]:
    """The mean final-epoch score (``metrics.main``; NaN: a diverged run) of each factor over the
    selection runs under ``folder`` that match ``cfg``'s setup (empty: none has run)."""
    rule, setup = Rule(cfg.selection.rule).value, setup_of(cfg)
    scores: dict[float, list[float]] = {}
    for path in sorted(cell_folder(cfg, folder).glob(f"*/{RESULTS}")):
        record = read_results(path)
        if same_setup(record, OmegaConf.load(path.parent / CONFIG), rule, setup):
            scores.setdefault(float(record["selection"]["lr_factor"]), []).append(float(record["metrics"]["main"]))
    return {factor: statistics.fmean(values) for factor, values in scores.items()}


def cell_folder(cfg: Any, folder: Path) -> Path:
    """Where the runs of ``cfg``'s (task, model, method, budget) lie under a runs folder."""
    return folder / cfg.task.name / cfg.model.name / f"{cfg.method.name}-{cfg.budget.name}"


def best_factor(means: dict[float, float]) -> float | None:
    """The factor with the best finite mean (ties: the one closest to 1x, then the smaller; a
    factor that scored NaN never wins); None when every factor scored NaN."""
    finite = {factor: mean for factor, mean in means.items() if math.isfinite(mean)}
    return max(finite, key=lambda f: (finite[f], -abs(math.log(f)), -f)) if finite else None


def owed_factor(means: dict[float, float]) -> float | None:
    """The factor one grid step past the best when the best is the smallest or the largest of
    the (at least two) factors tried, at the ratio of its neighbour (1x of {1, 4, 16} owes
    0.25x, 16x owes 64x); None when the best lies inside the factors tried: the grid then
    brackets it (``selection.extend_edges``)."""
    factors, best = sorted(means), best_factor(means)
    if len(factors) < 2 or best is None:
        return None
    if best == factors[0]:
        return factors[0] ** 2 / factors[1]
    if best == factors[-1]:
        return factors[-1] ** 2 / factors[-2]
    return None


def chosen_factor(cfg: Any, folder: Path) -> tuple[float, int]:
    """The factor the matching selection runs under ``folder`` chose (:func:`best_factor`) and
    the number of factors compared. Raises when there is none to choose from, and, with
    ``selection.extend_edges``, while the best sits at the edge of the factors tried and the
    next factor past it has not run (:func:`owed_factor`)."""
    means = factor_scores(cfg, folder)
    cell = f"{cfg.method.name}@{cfg.budget.name} on {cfg.task.name}"
    if not means:
        raise ValueError(
            f"no completed selection runs (rule {Rule(cfg.selection.rule).value}, protocol {cfg.protocol.name}) for "
            f"{cell} under {cell_folder(cfg, folder)}: run the selection stage first"
        )
    best = best_factor(means)
    if best is None:
        raise ValueError(f"every selection run of {cell} under {cell_folder(cfg, folder)} scored NaN (diverged): widen the grid downwards")
    owed = owed_factor(means) if cfg.selection.extend_edges else None
    if owed is not None:
        raise ValueError(
            f"{cell}: the best rate factor {best:g}x is at the edge of those tried ({', '.join(f'{f:g}x' for f in sorted(means))}); "
            f"selection.extend_edges asks for its selection run at {owed:g}x first (python -m experiments.edges "
            "<the selection sweep's overrides> prints every run owed)"
        )
    return best, len(means)


def best_epoch_metrics(history: list[dict[str, float]], final: dict[str, float]) -> dict[str, float]:
    """The evaluation with the highest ``main`` score among the run's evaluations (every
    headline metric here is higher-is-better), with its ``epoch`` and ``step``; the final
    metrics when the run evaluated only at its end. An evaluation without a score (NaN: a
    constant prediction has no Pearson correlation) never wins over one with a score."""
    if not history:
        return dict(final)
    scored = [entry for entry in history if not math.isnan(entry["eval_main"])]
    best = max(scored or history, key=lambda entry: entry["eval_main"])
    return {**metric_values(best, "eval"), "epoch": best.get("epoch"), "step": best.get("step")}


def selection_record(cfg: Any, rate: LearningRate) -> dict[str, Any]:
    """What results.json records about the run's rate and selection stage (``eval_split``:
    what its metrics were measured on)."""
    sel = cfg.selection
    return {
        "stage": Stage(sel.stage).value,
        "rule": Rule(sel.rule).value,
        "lr_factor": rate.factor,
        "base_lr": rate.base,
        "factors_compared": rate.candidates,
        "eval_split": HOLDOUT_SPLIT if carves_holdout(cfg) else cfg.task.eval_split,
        "from_runs": sel.from_runs,
    }
