"""GLUE metrics as GLUE defines them, computed with scikit-learn / scipy (no hub scripts).

- accuracy: RTE, SST-2 (and MRPC's second figure)
- f1 (of the positive class) and accuracy: MRPC; headline = F1
- matthews_correlation: CoLA
- pearson and spearman: STS-B; headline = Pearson

:func:`constant_baseline` scores the best constant predictor on the same labels: the level a
run must beat to have learned anything (MRPC F1 81.2 and RTE accuracy 52.7 on their dev sets).
:func:`metric_values` reads the metrics out of what ``Trainer.evaluate`` logs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def _accuracy(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": float(accuracy_score(labels, preds))}


def _f1_accuracy(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"f1": float(f1_score(labels, preds)), **_accuracy(preds, labels)}


def _matthews(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"matthews_correlation": float(matthews_corrcoef(labels, preds))}


def _pearson_spearman(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "pearson": float(pearsonr(preds, labels)[0]),
        "spearman": float(spearmanr(preds, labels)[0]),
    }


# headline metric name -> (function computing it and its companions)
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], dict[str, float]]] = {
    "accuracy": _accuracy,
    "f1": _f1_accuracy,
    "matthews_correlation": _matthews,
    "pearson": _pearson_spearman,
}


def compute_metrics(metric: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """All metrics of a task from raw model outputs; ``main`` is the headline metric.

    Classification predictions are the arg-max of the logits; regression predictions are the
    single output.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    logits = np.asarray(logits)
    if metric == "pearson":
        preds = logits.reshape(-1)
    else:
        preds = logits.argmax(axis=-1)
    result = METRICS[metric](preds, np.asarray(labels))
    result["main"] = result[metric]
    return result


def constant_baseline(metric: str, labels: np.ndarray) -> dict[str, float]:
    """The metrics of the best constant prediction on ``labels`` (every class tried; headline
    ``main``). A constant correlates with nothing: MCC and Pearson are 0."""
    labels = np.asarray(labels)
    if metric in ("matthews_correlation", "pearson"):
        return {metric: 0.0, "main": 0.0}
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    scores = [METRICS[metric](np.full_like(labels, c), labels) for c in np.unique(labels)]
    best = max(scores, key=lambda values: values[metric])
    return {**best, "main": best[metric]}


# the timing entries of a Trainer evaluation (eval_runtime, eval_samples_per_second, ...;
# model_preparation_time: an evaluation before any training, method=zero_shot): not scores
EVAL_TIMINGS = ("_runtime", "_per_second", "_preparation_time")


def metric_values(logged: dict[str, float], prefix: str) -> dict[str, float]:
    """The metrics of one ``Trainer.evaluate`` result, without ``prefix_`` and the timing
    entries (:data:`EVAL_TIMINGS`)."""
    return {k.removeprefix(f"{prefix}_"): v for k, v in logged.items() if k.startswith(f"{prefix}_") and not k.endswith(EVAL_TIMINGS)}
