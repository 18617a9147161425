"""A study's table from its store: final-stage runs, mean ± std over seeds per task, the
significance marks against a reference row, and the learning rate each cell used.

Rows are method@budget, or the method alone where it does not use the budget (the protocol and
selection rule are one per table, stated under it); ``epoch`` chooses the final-epoch metric
(``metrics``) or the best epoch's (``metrics_best``, the LoRA paper's reporting). Selection runs
(``selection.stage == select``) are left out of the table; the rate of each cell is the one its
final runs trained with. Two more views of the same store: the selection stage's score per rate
factor (:func:`selection_table`) and chosen pairs of rows compared per task, difference,
Welch's p and its false-discovery-adjusted q (:func:`comparison_table`).
"""

from __future__ import annotations

import statistics
from enum import Enum

import pandas as pd

from analysis.cells import ScoreTable, headline_scores, score_table
from analysis.render import to_markdown
from analysis.significance import ALPHA, MIN_SEEDS, POWER, compare, detectable_difference, fdr_adjusted, seed_scores, significance_marks, significance_note
from analysis.tables import PARAMS, ROW, column_headers, method_labels, params_cell, row_params, task_order
from experiments.selection import best_factor, owed_factor

STAGE = "selection.stage"
NOT_LEARNED = "○"  # a cell whose mean does not clear the floor of learning (learning_floors)
# Where every constant scores 0 (correlations), a mean just above 0 is not learning either: the
# study's bar (docs/protocols.md) is MCC above 0.10 and Pearson above 0.50, x100 here.
CORRELATION_FLOORS = {"matthews_correlation": 10.0, "pearson": 50.0}
NOT_RUN = "—"  # a cell with no run yet
NOT_TRAINED = "not trained"  # the rate cell of a method that trains nothing (a rate of 0)
CHOSEN = "*"  # the selection view's best factor, the rate the final runs take
NOT_CHOSEN_YET = "†"  # a best factor at the edge of those tried whose next one (selection.extend_edges) has not run
EXTEND_EDGES = "selection.extend_edges"
FACTORS_COMPARED = "selection.factors_compared"  # 0: the rate was given, not selected
LR_SCALE = ".lr_scale"  # <method>.lr_scale: the multiple of the run's rate some of its parameters train at


class Epoch(str, Enum):
    final = "final"
    best = "best"


def with_epoch(runs: pd.DataFrame, epoch: Epoch) -> pd.DataFrame:
    """``runs`` whose ``metrics.*`` columns hold the chosen epoch's metrics."""
    if Epoch(epoch) is Epoch.final:
        return runs
    best = [c for c in runs.columns if c.startswith("metrics_best.")]
    renamed = runs[best].rename(columns=lambda c: "metrics." + c.removeprefix("metrics_best."))
    return runs.drop(columns=[c for c in runs.columns if c.startswith("metrics.")]).join(renamed)


def final_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs a table reports: not selection runs; with their ``Method`` row label."""
    stage = runs[STAGE] if STAGE in runs else pd.Series("final", index=runs.index)
    runs = runs[stage.fillna("final") != "select"]
    return runs.assign(**{ROW: method_labels(runs)})


def one_value(runs: pd.DataFrame, column: str) -> str:
    """The single value of ``column`` over the table's runs ('mixed: a, b' when not single)."""
    values = sorted(runs[column].dropna().astype(str).unique()) if column in runs else []
    return values[0] if len(values) == 1 else ("mixed: " + ", ".join(values) if values else "not recorded")


def rate_table(runs: pd.DataFrame, rows: list[str], tasks: list[str]) -> pd.DataFrame:
    """The learning rate of each cell's runs (``1.0e-03``; several joined by '/'), and where a
    method trains some parameters at a multiple of it (``<method>.lr_scale``: TASO's adapters,
    (1/rho)^lr_gamma), their rate too: ``5.0e-04 (adapters 1.4e-03)``; ``not trained`` for a
    rate of 0 (method=zero_shot)."""
    if "lr" not in runs:
        return pd.DataFrame(NOT_RUN, index=pd.Index(rows, name=ROW), columns=tasks)
    rated = runs.dropna(subset=["lr"]).sort_values("lr")  # several rates in a cell: lowest first
    scale_columns = [c for c in rated.columns if c.endswith(LR_SCALE)]
    scale = rated[scale_columns].bfill(axis=1).iloc[:, 0].fillna(1.0) if scale_columns else pd.Series(1.0, index=rated.index)
    rated = rated.assign(rate=[rate_text(lr, s) for lr, s in zip(rated["lr"], scale)])
    table = rated.groupby([ROW, "task"])["rate"].apply(lambda v: "/".join(dict.fromkeys(v)))
    return table.unstack("task").reindex(index=rows, columns=tasks).fillna(NOT_RUN).rename_axis(index=ROW, columns=None)


def rate_text(lr: float, scale: float) -> str:
    if lr == 0:
        return NOT_TRAINED
    return f"{lr:.1e}" if scale == 1 else f"{lr:.1e} (adapters {lr * scale:.1e})"


def study_table(
    runs: pd.DataFrame, reference: str, epoch: Epoch = Epoch.final, seeds: frozenset[int] | None = None
) -> tuple[ScoreTable, pd.DataFrame]:
    """The score table (with significance marks against ``reference``; ``seeds``: those every
    row should have, :func:`analysis.cells.expected_seeds`) and the rate table."""
    runs = with_epoch(final_runs(runs), epoch)
    tasks = task_order(list(runs["task"].unique()))
    rows = sorted(runs[ROW].unique(), key=lambda r: (r != reference, r))
    table = score_table(runs, ROW, tasks, rows, seeds)
    scores = runs.assign(score=headline_scores(runs))
    marks = significance_marks(scores, ROW, reference).reindex(index=rows, columns=tasks).fillna("")
    headers = column_headers(runs, tasks)
    constant = learning_floors(runs).reindex(tasks)
    unlearned = table.means[tasks].le(constant, axis=1)
    table.text[tasks] = table.text[tasks] + marks.map(lambda m: f" {m}" if m else "") + unlearned.map(lambda u: f" {NOT_LEARNED}" if u else "")
    notes = [
        f"Protocol {one_value(runs, 'protocol')}; {rate_note(runs)}; {Epoch(epoch).value}-epoch metric x100, mean ± std over seeds.",
        significance_note(reference),
        constant_note(constant.rename(headers)),
        *table.notes,
    ]
    params = row_params(runs).apply(params_cell, axis=1)
    scores_table = ScoreTable(table.text, table.means, table.bold, notes).rename(headers).insert_column(PARAMS, params)
    return scores_table, rate_table(runs, rows, tasks).rename(columns=headers)


def rate_note(runs: pd.DataFrame) -> str:
    """How the table's rates were set: selected by the study's rule where each trained cell
    compared factors (``selection.factors_compared`` > 0), else given by the configuration (the
    protocol's rate for the task, else the method's default); a run that trains nothing (rate
    0: zero-shot) has no rate to set."""
    trained = runs[runs["lr"] > 0] if "lr" in runs else runs
    compared = trained[FACTORS_COMPARED].fillna(0) if FACTORS_COMPARED in trained else pd.Series(0, index=trained.index)
    rule = one_value(trained, "selection.rule")
    where = "validation slice carved from the training set" if rule == "holdout" else "official dev set: peeks"
    selected = f"rate selected by rule {rule} ({where})"
    given = "rate given, not selected (the protocol's for the task, else the method's default)"
    if compared.gt(0).all():
        return selected
    return given if compared.eq(0).all() else f"{selected} where a cell compared rates, else {given}"


def learning_floors(runs: pd.DataFrame) -> pd.Series:
    """Per task, the score x100 a mean must beat to count as learned: the best constant
    predictor's on the evaluation split (``metrics_constant.main``, recorded by each run), or
    :data:`CORRELATION_FLOORS` for a correlation metric; NaN where neither is known."""
    constant = 100 * runs.groupby("task")["metrics_constant.main"].max() if "metrics_constant.main" in runs else pd.Series(dtype=float)
    metric = runs.groupby("task")["metric"].first() if "metric" in runs else pd.Series(dtype=object)
    return pd.concat([constant, metric.map(CORRELATION_FLOORS)], axis=1).max(axis=1)


def constant_note(levels: pd.Series) -> str:
    known = ", ".join(f"{task} {value:.1f}" for task, value in levels.items() if pd.notna(value)) or "none recorded"
    return (
        f"{NOT_LEARNED}: mean not above the floor of learning on the same dev set: the best constant predictor, "
        f"or, where every constant scores 0, {' and '.join(f'{m} {v:g}' for m, v in CORRELATION_FLOORS.items())} ({known})"
    )


def selection_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The selection stage: each (method@budget, factor)'s validation score x100 per task
    (the mean over its seeds; ``nan``: constant or non-finite predictions; a dash: not run yet),
    the best factor of each cell marked (:func:`selection_marks`)."""
    runs = runs[runs[STAGE] == "select"] if STAGE in runs else runs.iloc[0:0]
    if runs.empty:
        return pd.DataFrame()
    runs = runs.assign(**{ROW: method_labels(runs), "score": headline_scores(runs)})
    cells = runs.groupby([ROW, "selection.lr_factor", "task"])["score"].agg(["mean", "size"]).unstack("task")
    tasks = task_order(list(cells["mean"].columns))
    means, ran = cells["mean"][tasks], cells["size"][tasks].notna()
    extends = runs.groupby([ROW, "task"])[EXTEND_EDGES].any() if EXTEND_EDGES in runs else pd.Series(dtype=bool)
    text = means.map(lambda v: "nan" if pd.isna(v) else f"{v:.1f}") + selection_marks(means, ran, extends)
    text = text.where(ran, NOT_RUN)
    text.index = [f"{row} {factor:g}x" for row, factor in text.index]
    return text.rename(columns=column_headers(runs, tasks)).rename_axis(index="method, rate factor", columns=None)


def selection_marks(means: pd.DataFrame, ran: pd.DataFrame, extends: pd.Series) -> pd.DataFrame:
    """Per (row, factor) and task (``means``' index and columns): :data:`CHOSEN` at the factor
    :func:`experiments.selection.best_factor` picks among those that ran (a tie goes to the
    factor closest to 1x, as there), the one the final runs take; :data:`NOT_CHOSEN_YET`
    instead where that factor is the smallest or largest tried and the (row, task)'s runs
    recorded ``selection.extend_edges`` (``extends``; a store keeps it in each run's config):
    its next factor (:func:`experiments.selection.owed_factor`) has not run, so no rate is
    chosen yet; elsewhere empty."""
    marks = pd.DataFrame("", index=means.index, columns=means.columns)
    for row, block in means.groupby(level=ROW):
        for task in means.columns:
            scores = {factor: float(v) for (_, factor), v in block[task].items() if ran.loc[(row, factor), task]}
            best = best_factor(scores)
            if best is not None:
                owes = bool(extends.get((row, task), False)) and owed_factor(scores) is not None
                marks.loc[(row, best), task] = NOT_CHOSEN_YET if owes else CHOSEN
    return marks


def selection_markdown(runs: pd.DataFrame) -> str:
    """The selection stage's scores as Markdown, with what they were measured on."""
    table = selection_table(runs)
    if table.empty:
        return "No selection runs in this store.\n"
    return (f"{table.to_markdown(disable_numparse=True)}\n\nSelection stage: validation-slice score x100 per rate factor "
            f"(final epoch, seed 0); {CHOSEN} marks the best factor, the one the final runs take. A factor outside the study's grid ran because "
            f"the best sat at the grid's edge (selection.extend_edges); {NOT_CHOSEN_YET} marks a best factor at the edge of those tried whose "
            "next one has not run yet: that rate is not chosen yet.\n")


def study_markdown(runs: pd.DataFrame, reference: str, epoch: Epoch = Epoch.final, seeds: frozenset[int] | None = None) -> str:
    """The table, its notes, and the learning rate per cell, as Markdown."""
    table, rates = study_table(runs, reference, epoch, seeds)
    return f"{to_markdown(table)}\n\nLearning rate per cell:\n\n{rates.to_markdown(disable_numparse=True)}\n"


def comparison_table(runs: pd.DataFrame, pairs: list[tuple[str, str]], epoch: Epoch = Epoch.final) -> pd.DataFrame:
    """Per task and per (row, reference) pair of ``pairs``: the difference of the mean scores
    x100 (row minus reference), Welch's two-sided p over seeds, its Benjamini-Hochberg q over
    every test of the table (:func:`analysis.significance.fdr_adjusted`), the mark of
    :func:`analysis.significance.compare` and the difference those seeds could detect
    (:func:`analysis.significance.detectable_difference`); a dash where either row has no
    completed run."""
    runs = with_epoch(final_runs(runs), epoch)
    tasks = task_order(list(runs["task"].unique()))
    unknown = sorted({row for pair in pairs for row in pair} - set(runs[ROW]))
    if unknown:
        raise ValueError(f"no final runs of {', '.join(unknown)} to compare (rows: {', '.join(sorted(runs[ROW].unique()))})")
    per_cell = seed_scores(runs.assign(score=headline_scores(runs)), ROW)
    labels = {pair: " - ".join(pair) for pair in pairs}
    sides = {(labels[row, ref], task): (per_cell[row, task], per_cell[ref, task])
             for row, ref in pairs for task in tasks if (row, task) in per_cell and (ref, task) in per_cell}
    tests = {key: compare(values, ref) for key, (values, ref) in sides.items()}
    q = dict(zip(tests, fdr_adjusted([p for p, _ in tests.values()])))

    def cell(key: tuple[str, str]) -> str:
        if key not in tests:
            return NOT_RUN
        (values, ref), (p, mark) = sides[key], tests[key]
        difference = statistics.fmean(values) - statistics.fmean(ref)
        return (f"{difference:+.1f} (p = {p:#.2g}, q = {q[key]:#.2g}, MDE {detectable_difference(values, ref):.1f})"
                f"{f' {mark}' if mark else ''}")

    table = pd.DataFrame({task: {label: cell((label, task)) for label in labels.values()} for task in tasks})
    return table.rename(columns=column_headers(runs, tasks)).rename_axis(index="difference", columns=None)


def comparison_markdown(runs: pd.DataFrame, pairs: list[tuple[str, str]], epoch: Epoch = Epoch.final) -> str:
    """The pairwise comparisons as Markdown, with the test they use."""
    table = comparison_table(runs, pairs, epoch)
    return (f"{table.to_markdown(disable_numparse=True)}\n\nDifference of the mean {Epoch(epoch).value}-epoch scores x100 over seeds, "
            f"with Welch's t-test's two-sided p (nan: fewer than {MIN_SEEDS} seeds on a side); ▲ / ▼ where p < {ALPHA}. "
            f"q: the p-value adjusted for this table's many tests (Benjamini-Hochberg over every p of the table): the marks "
            f"with q < {ALPHA} hold at a false discovery rate of {ALPHA:.0%}, a mark with a larger q may be one of the chance "
            "findings expected among so many tests. "
            f"MDE: the smallest difference the test would find with {POWER:.0%} power at these seed counts, "
            "taking the seeds' standard deviations as the true ones (a smaller difference going unmarked is no evidence of a tie).\n")
