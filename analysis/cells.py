"""Per-cell statistics shared by every table: headline scores x100, mean ± std over seeds,
and how many seeds completed, diverged, failed, scored NaN (undefined) or are missing.

A cell is one (row, task) pair. Its expected seeds are the table's (given, else every seed
that appears anywhere in it) and any further seed its own row ran, so a run that never
happened shows up as missing instead of vanishing, and extra seeds given to some rows (a
closer look at a comparison) do not make the other rows look short. Diverged
runs (a NaN / inf loss: a result of that configuration), failed runs (any other status
but ``completed``) and completed runs whose metric is undefined (NaN: a constant prediction
has no Pearson correlation) are counted apart, never averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

COMPLETED = "completed"
DIVERGED = "diverged"
MISSING = "—"
AVG = "Avg"
UNSCORED = ("diverged", "failed", "undefined")  # seeds counted apart, never averaged, in this order
INCOMPLETE = "†"  # marks an Avg over a cell short of seeds
INCOMPLETE_NOTE = f"{INCOMPLETE} averages cells short of seeds: missing, or {', '.join(UNSCORED)}"


def headline_scores(runs: pd.DataFrame) -> pd.Series:
    """Each run's headline metric x100: ``metrics.<metric>`` (the run's ``metric`` key), or
    ``metrics.main`` where a run names no metric; NaN for runs that did not complete."""

    def score(row: pd.Series) -> float:
        metric = row.get("metric")
        column = f"metrics.{metric}" if isinstance(metric, str) else "metrics.main"
        value = row.get(column, math.nan)
        return 100 * float(value) if row["status"] == COMPLETED and pd.notna(value) else math.nan

    return runs.apply(score, axis=1)


def cell_stats(runs: pd.DataFrame, row_key: str) -> pd.DataFrame:
    """One line per (row, task) that has any run: ``mean``, ``std`` (ddof 1, NaN for one
    seed), ``completed`` and a count per ``UNSCORED`` outcome. ``runs`` needs ``row_key``, ``task``, ``status``."""
    status = runs["status"]
    scores = headline_scores(runs)
    scored = runs.assign(
        score=scores, diverged=status == DIVERGED, failed=~status.isin([COMPLETED, DIVERGED]), undefined=(status == COMPLETED) & scores.isna()
    )
    stats = (
        scored.groupby([row_key, "task"])
        .agg(
            mean=("score", "mean"), std=("score", "std"), completed=("score", "count"), **{c: (c, "sum") for c in UNSCORED}
        )
        .reset_index()
    )
    return stats


def expected_seeds(runs: pd.DataFrame, row_key: str, rows: list[str], seeds: frozenset[int] | None) -> dict[str, frozenset[int]]:
    """Per row in ``rows``, the seeds each of its cells should have: ``seeds`` (None: every
    seed in ``runs``) and those the row ran beyond them, on any task whatever the outcome."""
    common = frozenset(runs["seed"]) if seeds is None else seeds
    ran = runs.groupby(row_key)["seed"].agg(frozenset)
    return {row: common | ran.get(row, frozenset()) for row in rows}


def seed_list(seeds: frozenset[int]) -> str:
    """``0-4`` for three or more consecutive seeds, else ``0, 2, 7``."""
    ordered = sorted(seeds)
    consecutive = len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1))
    return f"{ordered[0]}-{ordered[-1]}" if consecutive else ", ".join(map(str, ordered))


def seeds_note(common: frozenset[int], per_row: dict[str, frozenset[int]]) -> list[str]:
    """A footnote naming the rows whose seeds go beyond ``common``; none when no row's do."""
    extra: dict[frozenset[int], list[str]] = {}
    for row, seeds in per_row.items():
        if seeds != common:
            extra.setdefault(seeds, []).append(row)
    if not extra:
        return []
    rows = "; ".join(f"{seed_list(seeds)} for {', '.join(names)}" for seeds, names in extra.items())
    return [f"Seeds {seed_list(common)} per cell; {rows}."]


def format_cell(mean: float, std: float, completed: int, expected: int, unscored: dict[str, int]) -> str:
    """``71.2 ± 0.3``; ``71.2`` for one seed; with ``(1/3, 1 diverged, 1 failed, 1 undefined)``
    when seeds are missing or ``unscored`` counts some (keys: ``UNSCORED``); ``—`` when none has a score."""
    if completed == 0:
        text = MISSING
    elif math.isnan(std):
        text = f"{mean:.1f}"
    else:
        text = f"{mean:.1f} ± {std:.1f}"
    if completed < expected or any(unscored.values()):
        notes = f"{completed}/{expected}" + "".join(f", {n} {what}" for what, n in unscored.items() if n)
        text += f" ({notes})"
    return text


def best_mask(means: pd.DataFrame) -> pd.DataFrame:
    """True where a value is its column's maximum (ties all marked; NaN never)."""
    return means.eq(means.max(axis=0), axis=1) & means.notna()


@dataclass
class ScoreTable:
    """A table of formatted cells with its numbers: ``text`` (what is printed), ``means``
    (the numbers behind it, NaN where none), ``bold`` (best per column) and footnotes."""

    text: pd.DataFrame
    means: pd.DataFrame
    bold: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    def insert_column(self, name: str, values: pd.Series) -> ScoreTable:
        """The table with a leading, never-bold column (e.g. parameter counts)."""
        text, means, bold = self.text.copy(), self.means.copy(), self.bold.copy()
        text.insert(0, name, values.reindex(text.index))
        means.insert(0, name, math.nan)
        bold.insert(0, name, False)
        return ScoreTable(text, means, bold, self.notes)

    def rename(self, columns: dict[str, str]) -> ScoreTable:
        return ScoreTable(*(df.rename(columns=columns) for df in (self.text, self.means, self.bold)), self.notes)


def score_table(
    runs: pd.DataFrame, row_key: str, tasks: list[str], rows: list[str] | None = None, seeds: frozenset[int] | None = None
) -> ScoreTable:
    """Rows ``row_key`` (in the order ``rows``, else sorted), one column per task in
    ``tasks`` and ``Avg``: the mean of the row's task means, only when every task has one
    (marked :data:`INCOMPLETE` when a cell behind it is short of its :func:`expected_seeds`
    for ``seeds``). Best per column is bold."""
    stats = cell_stats(runs, row_key)
    rows = rows if rows is not None else sorted(stats[row_key].unique())
    stats = stats.set_index([row_key, "task"])
    full_index = pd.MultiIndex.from_product([rows, tasks], names=[row_key, "task"])
    per_row = expected_seeds(runs, row_key, rows, seeds)
    expected = pd.Series([len(per_row[row]) for row, _ in full_index], index=full_index)
    stats = stats.reindex(full_index).fillna(dict.fromkeys(("completed", *UNSCORED), 0))
    cells = stats.apply(
        lambda s: format_cell(s["mean"], s["std"], int(s["completed"]), expected[s.name], {c: int(s[c]) for c in UNSCORED}), axis=1
    )
    text = cells.unstack("task").reindex(index=rows, columns=tasks).rename_axis(columns=None)
    means = stats["mean"].unstack("task").reindex(index=rows, columns=tasks).rename_axis(columns=None)
    complete = stats["completed"] == expected
    all_complete = complete.unstack("task").reindex(index=rows, columns=tasks).all(axis=1)
    means[AVG] = means[tasks].mean(axis=1).where(means[tasks].notna().all(axis=1))
    text[AVG] = [
        MISSING if math.isnan(avg) else f"{avg:.1f}" + ("" if ok else INCOMPLETE) for avg, ok in zip(means[AVG], all_complete)
    ]
    notes = [] if seeds is None else seeds_note(seeds, per_row)
    notes += [] if all_complete[means[AVG].notna()].all() else [INCOMPLETE_NOTE]
    if stats["undefined"].any():
        notes.append("undefined: a completed seed whose metric has no value (NaN: constant predictions), not averaged")
    return ScoreTable(text, means, best_mask(means), notes)
