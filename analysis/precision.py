"""Does bf16 autocast change what a run learns? The same runs in two precisions, seed by seed.

Runs that agree on model, task, method, budget and seed but differ in the precision they
trained in (results.json ``precision``) are paired; per (model, task, method@budget) the table
gives each precision's mean ± std over seeds, the mean of the per-seed differences, and the
two-sided p of a paired t-test (``scipy.stats.ttest_rel``: the same seed means the same data
order and initialisation, so the pairs differ only by precision). Headline metric x100, as in
every table. A difference inside the seeds' own spread, with a large p, is "within noise".

    python -m analysis.precision --runs runs/precision_check --runs runs/glue_minilm_cpu [--reference fp32]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd
from scipy.stats import ttest_rel

from analysis.cells import headline_scores
from analysis.collect import IDENTITY, check_unique, load_runs

CELL = ["model", "task", "method", "budget"]


def paired_scores(runs: pd.DataFrame, reference: str) -> tuple[pd.DataFrame, str]:
    """One line per (model, task, method, budget, seed) trained in ``reference`` and in one
    other precision: the score in each (columns named by precision); and that other precision."""
    check_unique(runs, IDENTITY + ["precision"])
    precisions = sorted(set(runs["precision"].dropna()) - {reference})
    if reference not in set(runs["precision"]) or len(precisions) != 1:
        raise ValueError(f"need runs in {reference!r} and in one other precision; found {sorted(set(runs['precision'].dropna()))}")
    scored = runs.assign(score=headline_scores(runs))
    wide = scored.pivot_table(index=IDENTITY, columns="precision", values="score", aggfunc="first")
    return wide.dropna(subset=[reference, precisions[0]]).reset_index(), precisions[0]


def precision_table(runs: pd.DataFrame, reference: str = "fp32") -> pd.DataFrame:
    """Per cell: each precision's mean ± std, the mean per-seed difference (other - reference)
    and the paired t-test's p over the seeds both precisions ran."""
    pairs, other = paired_scores(runs, reference)
    rows = []
    for cell, group in pairs.groupby(CELL):
        a, b = group[reference].tolist(), group[other].tolist()
        p = float(ttest_rel(b, a).pvalue) if len(a) >= 2 else math.nan
        rows.append(
            {
                **dict(zip(CELL, cell)),
                "seeds": ",".join(str(int(s)) for s in group["seed"]),
                reference: f"{pd.Series(a).mean():.1f} ± {pd.Series(a).std():.1f}",
                other: f"{pd.Series(b).mean():.1f} ± {pd.Series(b).std():.1f}",
                f"{other} - {reference}": f"{pd.Series(b).sub(a).mean():+.1f}",
                "paired t-test p": f"{p:.2f}",
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, action="append", required=True, help="a runs folder (repeat for several)")
    parser.add_argument("--reference", default="fp32", help="the precision the others are compared with")
    args = parser.parse_args()
    runs = pd.concat([load_runs(folder) for folder in args.runs], ignore_index=True)
    print(precision_table(runs, args.reference).to_markdown(index=False, disable_numparse=True))


if __name__ == "__main__":
    main()
