"""Runs of a Weights & Biases project as rows like :func:`analysis.collect.load_runs`'s.

The harness logs the resolved config (``task``, ``method``, ``budget``, ``model``, ``seed``)
and the Trainer logs ``eval/<metric>`` into the summary; parameter counts and step times
live only in results.json, so those columns are empty for W&B runs. Runs still running are
left out; crashed or failed ones count as failed. Needs ``wandb`` and network access (runs
logged offline must be ``wandb sync``-ed first).
"""

from __future__ import annotations

import sys
from typing import Any

import pandas as pd

from analysis.collect import flatten

FINISHED, RUNNING = "finished", "running"


def wandb_record(config: dict[str, Any], summary: dict[str, Any], state: str, path: str) -> dict[str, Any]:
    """One W&B run as a results.json-like record."""
    return {
        "task": config["task"]["name"],
        "method": config["method"]["name"],
        "budget": config["budget"]["name"],
        "budget_rank": config["budget"]["rank"],
        "model": config["model"]["name"],
        "seed": config["seed"],
        "metric": config["task"]["metric"],
        "status": "completed" if state == FINISHED else "failed",
        "metrics": {k.removeprefix("eval/"): v for k, v in summary.items() if k.startswith("eval/")},
        "run_dir": f"wandb:{path}",
    }


def load_wandb_runs(project: str) -> pd.DataFrame:
    """The harness runs of W&B project ``entity/project`` (clear errors when wandb is missing
    or the project cannot be reached)."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb needs the wandb package: pip install wandb") from None
    try:
        runs = list(wandb.Api().runs(project))
    except Exception as error:  # the client raises many kinds (auth, network, not found)
        raise SystemExit(f"cannot read W&B project {project!r} (offline, not logged in, or no such project): {error}") from None
    records = []
    for run in runs:
        if run.state == RUNNING or "task" not in run.config:
            print(f"warning: W&B run {run.path} skipped ({run.state}, or not a harness run)", file=sys.stderr)
            continue
        records.append(wandb_record(run.config, run.summary_metrics, run.state, "/".join(run.path)))
    if not records:
        raise SystemExit(f"no finished harness runs in W&B project {project!r}")
    return flatten(records)
