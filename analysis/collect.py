"""Gather every results.json under a folder into one pandas DataFrame (one row per run).

A results.json that does not parse is refused with its path: storage writes atomically
(temporary file, then rename), so a broken file is a real problem to look at, never a run
still in progress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from experiments.storage import RESULTS, read_results

IDENTITY = ["model", "task", "method", "budget", "seed"]


def flatten(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Records as a DataFrame, nested keys joined by '.', bulky per-step fields dropped."""
    for record in records:
        record.pop("eval_history", None)
        record.pop("traceback", None)
    return pd.json_normalize(records)


def load_runs(root: Path) -> pd.DataFrame:
    """Flattened results (nested keys joined by '.'), plus the run folder as ``run_dir``."""
    records = [{**read_results(path), "run_dir": str(path.parent)} for path in sorted(Path(root).rglob(RESULTS))]
    if not records:
        raise FileNotFoundError(f"no {RESULTS} under {root}")
    return flatten(records)


def check_unique(runs: pd.DataFrame, key: list[str]) -> None:
    """Refuse two runs with the same ``key`` (e.g. a run folder copied elsewhere), naming
    their folders, rather than averaging them as if they were different seeds."""
    repeated = runs[runs.duplicated(key, keep=False)]
    if not repeated.empty:
        groups = repeated.groupby(key, dropna=False)["run_dir"].apply(", ".join)
        lines = [f"  {dict(zip(key, k))}: {dirs}" for k, dirs in groups.items()]
        raise ValueError("the same run appears more than once; point --runs at one experiment's folder:\n" + "\n".join(lines))
