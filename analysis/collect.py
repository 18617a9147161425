"""Gather every results.json under a folder into one pandas DataFrame (one row per run)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.storage import RESULTS, read_results


def load_runs(root: Path) -> pd.DataFrame:
    """Flattened results (nested keys joined by '.'), plus the run folder as ``run_dir``."""
    rows = []
    for path in sorted(Path(root).rglob(RESULTS)):
        record = read_results(path)
        record.pop("eval_history", None)
        record.pop("traceback", None)
        record["run_dir"] = str(path.parent)
        rows.append(record)
    if not rows:
        raise FileNotFoundError(f"no {RESULTS} under {root}")
    return pd.json_normalize(rows)
