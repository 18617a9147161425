"""The paper-style results table, one per backbone model.

Rows are method@budget (the method alone where it does not use the budget: full, BitFit; with
the run folder's override hash when runs of one row differ in other options) and their trainable
parameters: the count (``effective_params`` where a method records one, e.g. SoRA's surviving
ranks, beside the allocated count) and its share of the model's non-head parameters
(``total_params - head_params``: exact for methods that train backbone weights, counting the
adapter itself for methods that add one, which changes the share by that same tiny fraction).
Columns are each task's headline metric x100, mean ± std over seeds, and Avg. Missing or failed
seeds are written in the cell.

    python -m analysis.tables --runs runs [--out runs/tables] [--wandb entity/project]

Writes ``<out>/<model>.md``, ``.csv`` and ``.tex`` (booktabs) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

from analysis.cells import COMPLETED, ScoreTable, score_table
from analysis.collect import IDENTITY, check_unique, load_runs
from analysis.render import to_markdown, write_table
from experiments.methods import row_name

TASK_ORDER = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
METRIC_ABBREV = {"accuracy": "Acc", "f1": "F1", "matthews_correlation": "MCC", "pearson": "Pearson"}
ROW = "Method"
PARAMS = "Params (%)"
PARAM_COLUMNS = ["trainable_params", "effective_params", "total_params", "head_params"]


def variant(run_dir: str) -> str:
    """The override hash of a run folder ``.../seed<k>-<hash>``; '' for ``default``."""
    match = re.search(r"seed\d+-([^/\\]+)$", str(run_dir))
    return "" if match is None or match.group(1) == "default" else match.group(1)


def method_labels(runs: pd.DataFrame) -> pd.Series:
    """``method@budget``, or ``method`` for a method that does not use the budget
    (:func:`experiments.methods.row_name`: full, BitFit, ...) when its runs here have one budget
    (at several, each keeps its own, so that no row mixes them)."""
    method, budget = runs["method"].astype(str), runs["budget"].astype(str)
    several = budget.groupby(method).transform("nunique") > 1
    names = pd.Series([row_name(m, b) for m, b in zip(method, budget)], index=runs.index, dtype=object)
    return names.where(~several, method + "@" + budget)


def row_labels(runs: pd.DataFrame) -> pd.Series:
    """:func:`method_labels`, plus ``[hash]`` for runs with other overrides (``variant``)."""
    return method_labels(runs) + runs["variant"].map(lambda v: f" [{v}]" if v else "")


def task_order(tasks: list[str]) -> list[str]:
    """GLUE's order, then the other tasks alphabetically."""
    return sorted(tasks, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t))


def format_count(n: float) -> str:
    """896, 12.3K, 1.23M."""
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{n:.0f}"


def row_params(runs: pd.DataFrame) -> pd.DataFrame:
    """Per row, over its completed runs: ``trainable`` (median), ``effective`` (mean of
    ``effective_params``, NaN where not recorded), ``params`` (effective where recorded, else
    trainable) and ``share`` (``params`` in % of the non-head parameters)."""
    done = runs[runs["status"] == COMPLETED].reindex(columns=[ROW, *PARAM_COLUMNS])
    done = done.assign(non_head=done["total_params"] - done["head_params"])
    params = done.groupby(ROW).agg(
        trainable=("trainable_params", "median"), effective=("effective_params", "mean"), non_head=("non_head", "median")
    )
    params["params"] = params["effective"].fillna(params["trainable"])
    params["share"] = 100 * params["params"] / params["non_head"]
    return params.drop(columns="non_head")


def params_cell(params: pd.Series) -> str:
    """``1.23M (0.054%)``, ``0.41M eff. / 1.23M (0.018%)``, or ``?`` when not recorded."""
    if pd.isna(params["trainable"]):
        return "?"
    count = format_count(params["trainable"])
    if pd.notna(params["effective"]):
        count = f"{format_count(params['effective'])} eff. / {count}"
    share = params["share"]
    return f"{count} ({share:.0f}%)" if share >= 10 else f"{count} ({share:.2g}%)"


# reference rows, first and in this order: the model as loaded, then the linear probe
REFERENCE_METHODS = ("zero_shot", "head_only")


def row_order(runs: pd.DataFrame) -> list[str]:
    """Rows by method (the reference rows first), then budget rank (then label)."""
    keys = runs.assign(rank=runs.get("budget_rank", 0)).groupby(ROW)[["method", "rank"]].first()

    def key(label: str) -> tuple:
        method = keys.loc[label, "method"]
        reference = REFERENCE_METHODS.index(method) if method in REFERENCE_METHODS else len(REFERENCE_METHODS)
        return (reference, method, keys.loc[label, "rank"], label)

    return sorted(keys.index, key=key)


def results_table(runs: pd.DataFrame) -> ScoreTable:
    """The table of one model's runs, as :func:`by_model` gives them."""
    tasks = task_order(list(runs["task"].unique()))
    table = score_table(runs, ROW, tasks, row_order(runs))
    params = row_params(runs).apply(params_cell, axis=1)
    return table.rename(column_headers(runs, tasks)).insert_column(PARAMS, params)


def column_headers(runs: pd.DataFrame, tasks: list[str]) -> dict[str, str]:
    """``RTE (Acc)``: the task and its headline metric, as the runs name it."""
    metrics = runs.dropna(subset=["metric"]).groupby("task")["metric"].first() if "metric" in runs else {}
    return {t: f"{t.upper()} ({METRIC_ABBREV.get(metrics[t], metrics[t])})" if t in metrics else t.upper() for t in tasks}


def by_model(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each model's runs with their row label in ``Method``, after refusing any run
    recorded twice: by its identity (``run_id``: config and data, wherever its folder is), and
    for runs recorded without one, by the identity its folder path gives."""
    runs = runs.assign(variant=runs["run_dir"].map(variant))
    if "run_id" in runs:
        check_unique(runs.dropna(subset=["run_id"]), ["run_id"])
    check_unique(runs, [*IDENTITY, "variant"])
    runs = runs.assign(**{ROW: row_labels(runs)})
    return {str(model): group for model, group in runs.groupby("model")}


def results_tables(runs: pd.DataFrame) -> dict[str, ScoreTable]:
    """One table per model."""
    return {model: results_table(group) for model, group in by_model(runs).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="folder searched recursively for results.json")
    parser.add_argument("--out", type=Path, help="where the tables go (default: <runs>/tables)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the finished runs of this W&B project")
    args = parser.parse_args()
    runs = load_runs(args.runs)
    if args.wandb:
        from analysis.wandb_runs import load_wandb_runs

        runs = pd.concat([runs, load_wandb_runs(args.wandb)], ignore_index=True)
    out = args.out or args.runs / "tables"
    for model, table in results_tables(runs).items():
        print(f"## {model}\n\n{to_markdown(table)}\n")
        for path in write_table(table, out / model):
            print(path)


if __name__ == "__main__":
    main()
