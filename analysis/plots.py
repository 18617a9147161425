"""Figures from a runs folder, one set per model (PNG and PDF):

- ``<model>_score_vs_params``: one point per method@budget, the mean over tasks of the
  per-task mean score (the table's Avg; rows missing a task are left out) against trainable
  parameters (effective where recorded), log x;
- ``<model>_step_cost``: median training-step time per method over its completed runs, as a
  ratio to BitFit's when BitFit ran, else in seconds;
- ``<model>_core_map``: TASO's core-region map of the first TASO run that saved one.

    python -m analysis.plots --runs runs [--out runs/plots]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analysis.cells import AVG, COMPLETED
from analysis.collect import load_runs
from analysis.core_map import MAP_FILE, plot_core_map
from analysis.figures import plt, save_figure
from analysis.tables import ROW, by_model, results_table, row_params

BASELINE = "bitfit"


def plot_score_vs_params(runs: pd.DataFrame, out: Path) -> list[Path]:
    """Score (Avg over tasks) against trainable parameters, one model's runs."""
    points = row_params(runs).join(results_table(runs).means[AVG]).dropna(subset=["params", AVG])
    points["method"] = runs.groupby(ROW)["method"].first()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, group in points.sort_values("params").groupby("method"):
        ax.plot(group["params"], group[AVG], "o-", label=method)
        for label, row in group.iterrows():
            ax.annotate(label.partition("@")[2], (row["params"], row[AVG]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="trainable parameters (effective where recorded)", ylabel="score x100, mean over tasks")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def step_cost(runs: pd.DataFrame) -> tuple[pd.Series, str]:
    """Median ``step_time_s`` per method, relative to BitFit's when present; and its unit."""
    done = runs[runs["status"] == COMPLETED].dropna(subset=["step_time_s"])
    median = done.groupby("method")["step_time_s"].median().sort_values()
    if BASELINE in median:
        return median / median[BASELINE], "median step time / BitFit's"
    return median, "median step time (s)"


def plot_step_cost(runs: pd.DataFrame, out: Path) -> list[Path]:
    cost, unit = step_cost(runs)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(cost.index, cost.values, color="0.5")
    ax.set(ylabel=unit, title="training-step cost per method")
    fig.tight_layout()
    return save_figure(fig, out)


def core_map_run(runs: pd.DataFrame) -> Path | None:
    """The first completed TASO run folder (sorted) holding a core-region map."""
    taso = runs[(runs["method"] == "taso") & (runs["status"] == COMPLETED)]
    folders = sorted(Path(d) for d in taso["run_dir"] if (Path(d) / MAP_FILE).is_file())
    return folders[0] if folders else None


def plot_all(runs: pd.DataFrame, out: Path) -> list[Path]:
    """Every figure of every model in ``runs`` under ``out``; returns the files written."""
    written = []
    for model, group in by_model(runs).items():
        written += plot_score_vs_params(group, out / f"{model}_score_vs_params")
        if group.get("step_time_s", pd.Series(dtype=float)).notna().any():
            written += plot_step_cost(group, out / f"{model}_step_cost")
        taso_run = core_map_run(group)
        if taso_run is not None:
            written += plot_core_map(taso_run, None, out / f"{model}_core_map")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="folder searched recursively for results.json")
    parser.add_argument("--out", type=Path, help="where the figures go (default: <runs>/plots)")
    args = parser.parse_args()
    for path in plot_all(load_runs(args.runs), args.out or args.runs / "plots"):
        print(path)


if __name__ == "__main__":
    main()
