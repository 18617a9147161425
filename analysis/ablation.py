"""The TASO ablation table: each reading of the paper's open details, per task, mean ± std
over seeds of the headline metric (x100), beside LoRA at the same budget (cells as in
:mod:`analysis.tables`: missing and failed seeds written in the cell, best in bold).

    python -m analysis.ablation --runs runs/taso_ablation --out docs/taso_ablation_full.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from analysis.cells import ScoreTable, score_table
from analysis.collect import load_runs
from analysis.render import to_markdown
from experiments.storage import CONFIG

VARIANT_COLUMNS = ["taso.scope", "taso.granularity", "taso.importance", "taso.rank", "taso.lr_gamma"]


def variant_name(row: pd.Series) -> str:
    """``lora r1``, or TASO's options that differ from the paper's reading."""
    if row["method"] != "taso":
        return f"{row['method']} {row['budget']}"
    return (
        f"taso {row['budget']} scope={row['taso.scope']} R={int(row['taso.rank'])} gamma={row['taso.lr_gamma']:g}"
        + ("" if row["taso.granularity"] == "rows+cols" else f" gran={row['taso.granularity']}")
        + ("" if row["taso.importance"] == "grad_x_weight" else f" imp={row['taso.importance']}")
    )


def config_options(run_dir: str) -> pd.Series:
    """TASO's options as the run's config.yaml sets them: a failed run records none in
    results.json, but still counts as a failed seed of its variant."""
    cfg = OmegaConf.load(Path(run_dir) / CONFIG)
    method = cfg.method
    rank = method.rank if method.rank is not None else 8 * cfg.budget.rank  # as taso.method.Taso.block_rank
    values = [method.scope, method.granularity, method.importance, rank, method.lr_gamma]
    return pd.Series(dict(zip(VARIANT_COLUMNS, values)))


def ablation_table(runs: pd.DataFrame) -> ScoreTable:
    """Rows: variants; columns: tasks (mean ± std over seeds) and Avg of the task means."""
    runs = runs.assign(**{c: None for c in VARIANT_COLUMNS if c not in runs})
    unrecorded = (runs["method"] == "taso") & runs["taso.scope"].isna()
    if unrecorded.any():
        runs.loc[unrecorded, VARIANT_COLUMNS] = runs.loc[unrecorded, "run_dir"].apply(config_options)
    runs = runs.assign(variant=runs.apply(variant_name, axis=1))
    return score_table(runs, "variant", sorted(runs["task"].unique()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    table = to_markdown(ablation_table(load_runs(args.runs)))
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
