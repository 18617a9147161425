"""Whether a table row differs from a reference row, per task: Welch's t-test over seeds.

Welch's unequal-variance t-test (``scipy.stats.ttest_ind(equal_var=False)``), two-sided, on
the per-seed headline scores of a cell and of the reference row's cell on the same task; a
cell is marked only when both have at least ``MIN_SEEDS`` completed seeds and p < ``ALPHA``.
Where it finds nothing, :func:`detectable_difference` says how large a difference those seeds
could have found; over a table of many tests, :func:`fdr_adjusted` says which marks hold at a
false discovery rate of ``ALPHA`` (Benjamini & Hochberg 1995).
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, ttest_ind

MIN_SEEDS = 3
ALPHA = 0.05
POWER = 0.8
HIGHER, LOWER = "▲", "▼"


def welch_pvalue(a: Any, b: Any, **options: Any) -> Any:
    """``scipy.stats.ttest_ind(a, b, equal_var=False).pvalue``, without scipy's warning of a
    constant side: seeds that all scored the same (a constant predictor) leave it a variance of
    ~0, and the test is then the other side's one-sample t-test, as it should be."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        return ttest_ind(a, b, equal_var=False, **options).pvalue


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p of Welch's t-test; NaN with fewer than MIN_SEEDS values on a side or when
    both sides are constant (no spread to test)."""
    if min(len(a), len(b)) < MIN_SEEDS:
        return math.nan
    return float(welch_pvalue(a, b))


def detectable_difference(a: list[float], b: list[float], alpha: float = ALPHA, power: float = POWER, draws: int = 20000) -> float:
    """The smallest true difference of means that Welch's two-sided test at ``alpha`` finds
    with probability ``power`` for seed counts like ``a``'s and ``b``'s, with their sample
    standard deviations taken as the true ones: the test run on ``draws`` simulated pairs of
    normal samples (seeded; the same draws at every difference), the difference found by
    bisection. NaN with fewer than MIN_SEEDS values on a side; 0 when neither side varies."""
    if min(len(a), len(b)) < MIN_SEEDS:
        return math.nan
    sd_a, sd_b = statistics.stdev(a), statistics.stdev(b)
    if sd_a == sd_b == 0:
        return 0.0
    rng = np.random.default_rng(0)
    noise_a, noise_b = sd_a * rng.standard_normal((draws, len(a))), sd_b * rng.standard_normal((draws, len(b)))

    def found(difference: float) -> float:
        return float(np.mean(welch_pvalue(difference + noise_a, noise_b, axis=1) < alpha))

    low, high = 0.0, max(sd_a, sd_b)
    while found(high) < power:
        low, high = high, 2 * high
    for _ in range(30):
        low, high = (low, (low + high) / 2) if found((low + high) / 2) >= power else ((low + high) / 2, high)
    return high


def fdr_adjusted(pvalues: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (q) of a family of tests
    (``scipy.stats.false_discovery_control``): the tests with q < alpha are those its step-up
    procedure rejects at a false discovery rate of alpha. A NaN p (a test not made) stays NaN
    and does not count in the family."""
    made = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    adjusted = false_discovery_control([pvalues[i] for i in made]) if made else []
    q = [math.nan] * len(pvalues)
    for i, value in zip(made, adjusted):
        q[i] = float(value)
    return q


def compare(values: list[float], reference: list[float], alpha: float = ALPHA) -> tuple[float, str]:
    """Welch's p of ``values`` against ``reference`` and the mark: ``▲`` / ``▼`` where p < alpha
    and the mean is above / below the reference's, else ''."""
    p = welch_p(values, reference)
    if not p < alpha:
        return p, ""
    return p, HIGHER if statistics.fmean(values) > statistics.fmean(reference) else LOWER


def seed_scores(scores: pd.DataFrame, row_key: str) -> pd.Series:
    """The completed runs' scores of each (row, task) as a list, one per seed; ``scores`` has
    ``row_key``, ``task`` and ``score`` (NaN: a run that did not complete, left out)."""
    return scores.dropna(subset=["score"]).groupby([row_key, "task"])["score"].apply(list)


def significance_marks(scores: pd.DataFrame, row_key: str, reference: str, alpha: float = ALPHA) -> pd.DataFrame:
    """``▲`` / ``▼`` per (row, task) where the row's seeds are significantly above / below the
    ``reference`` row's on that task, else ''. ``scores`` has ``row_key``, ``task``, ``score``
    (NaN for runs that did not complete, left out)."""
    per_cell = seed_scores(scores, row_key)
    marks = {}
    for (row, task), values in per_cell.items():
        ref = per_cell.get((reference, task))
        if row == reference or ref is None:
            continue
        _, mark = compare(values, ref, alpha)
        if mark:
            marks[(row, task)] = mark
    index = pd.MultiIndex.from_tuples(list(marks), names=[row_key, "task"]) if marks else None
    return pd.Series(marks, index=index, dtype=object).unstack("task") if marks else pd.DataFrame()


def significance_note(reference: str, alpha: float = ALPHA) -> str:
    return (
        f"{HIGHER} / {LOWER}: above / below {reference} on that task by Welch's t-test over seeds "
        f"(two-sided, p < {alpha}, at least {MIN_SEEDS} seeds on each side; each test alone, not adjusted for their number)"
    )
