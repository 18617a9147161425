"""What a run returns to an optimising Hydra sweeper (``hydra/sweeper=optuna``).

Optuna's objective is the value the Hydra job returns. Under that sweeper a run returns the
score that the final stage's ``selection.from_runs`` compares (:func:`experiments.selection.chosen_factor`):
``metrics.main`` at the final epoch on the validation slice carved from the training set, so
an optimiser sees what the grid's selection sees and nothing more. It only optimises holdout
selection runs (``selection.stage=select``, ``selection.rule=holdout``): a final run, or a
selection run scored on the official dev set (``rule=dev``), is refused before it trains.
Under any other sweeper a run returns the path of its results.json.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from experiments.config import ConfigError
from experiments.selection import Rule, Stage, carves_holdout
from experiments.storage import read_results


def optimises(sweeper: Any) -> bool:
    """True when Hydra's sweeper (``HydraConfig.get().sweeper``) optimises the jobs' return values."""
    return "optuna" in str(sweeper.get("_target_", ""))


def check_optimisable(cfg: Any) -> None:
    """Raise :class:`ConfigError` unless ``cfg`` is a holdout selection run, the only kind
    whose score an optimiser may read without peeking at the dev set the tables report."""
    if not carves_holdout(cfg):
        raise ConfigError(
            f"hydra/sweeper=optuna optimises the score on the validation slice of selection runs; this run "
            f"(selection.stage={Stage(cfg.selection.stage).value}, selection.rule={Rule(cfg.selection.rule).value}) is scored on the dev set "
            "the tables report: run the optimiser with selection.stage=select selection.rule=holdout "
            "(conf/experiment/glue_minilm_cpu_select_optuna.yaml), then the final stage as a plain -m sweep "
            "with selection.from_runs"
        )


def objective(results: Path) -> float:
    """The run's final-epoch ``metrics.main``; ``-inf`` for a run without a finite score (diverged,
    or a metric undefined on constant predictions), which ``selection.from_runs`` never picks."""
    record = read_results(results)
    score = (record.get("metrics") or {}).get("main") if record.get("status") == "completed" else None
    return float(score) if score is not None and math.isfinite(score) else -math.inf
