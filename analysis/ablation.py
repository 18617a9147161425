"""The TASO ablation table: each reading of the paper's open details, per task, mean ± std
over seeds of the headline metric (x100), beside LoRA at the same budget.

    python -m analysis.ablation --runs runs/taso_ablation --out docs/taso_ablation.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analysis.collect import load_runs

VARIANT_COLUMNS = ["taso.scope", "taso.granularity", "taso.importance", "taso.rank", "taso.lr_gamma"]


def variant_name(row: pd.Series) -> str:
    if row["method"] != "taso":
        return f"{row['method']} {row['budget']}"
    return (
        f"taso {row['budget']} scope={row['taso.scope']} R={int(row['taso.rank'])} gamma={row['taso.lr_gamma']:g}"
        + ("" if row["taso.granularity"] == "rows+cols" else f" gran={row['taso.granularity']}")
        + ("" if row["taso.importance"] == "grad_x_weight" else f" imp={row['taso.importance']}")
    )


def ablation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Rows: variants; columns: tasks ("mean ± std (n)") and the average of task means."""
    done = runs[runs["status"] == "completed"].copy()
    for column in VARIANT_COLUMNS:
        if column not in done:
            done[column] = None
    done["variant"] = done.apply(variant_name, axis=1)
    done["score"] = 100 * done["metrics.main"]
    stats = done.groupby(["variant", "task"])["score"].agg(["mean", "std", "count"]).reset_index()
    cells = stats.assign(cell=stats.apply(lambda r: f"{r['mean']:.1f} ± {r['std']:.1f} ({int(r['count'])})", axis=1))
    table = cells.pivot(index="variant", columns="task", values="cell")
    table["avg"] = stats.pivot(index="variant", columns="task", values="mean").mean(axis=1).map("{:.1f}".format)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    table = ablation_table(load_runs(args.runs)).to_markdown()
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
