"""GLUE metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments.metrics import compute_metrics


def one_hot_logits(preds: list[int]) -> np.ndarray:
    return np.eye(2)[preds]


def test_accuracy() -> None:
    out = compute_metrics("accuracy", one_hot_logits([1, 0, 1, 1]), np.array([1, 0, 0, 1]))
    assert out["accuracy"] == out["main"] == 0.75


def test_mrpc_f1_and_accuracy() -> None:
    # preds 1,1,0,1,0 vs labels 1,0,0,1,1: TP=2 FP=1 FN=1 -> F1 = 2*2/(2*2+1+1) = 2/3
    out = compute_metrics("f1", one_hot_logits([1, 1, 0, 1, 0]), np.array([1, 0, 0, 1, 1]))
    assert out["f1"] == out["main"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(3 / 5)


def test_cola_matthews() -> None:
    # TP=2 TN=1 FP=1 FN=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    out = compute_metrics("matthews_correlation", one_hot_logits([1, 1, 0, 1, 0]), np.array([1, 0, 0, 1, 1]))
    assert out["main"] == pytest.approx(1 / 6)


def test_stsb_pearson_spearman() -> None:
    preds = np.array([[1.0], [2.0], [3.0], [5.0]])
    labels = np.array([1.0, 3.0, 2.0, 4.0])
    # Pearson by hand: means 2.75 and 2.5; cross-deviation sum 5.5; squared-deviation sums 8.75 and 5
    assert compute_metrics("pearson", preds, labels)["pearson"] == pytest.approx(5.5 / math.sqrt(8.75 * 5))
    # Spearman: ranks 1,2,3,4 vs 1,3,2,4 -> 1 - 6*2/(4*15) = 0.8
    assert compute_metrics("pearson", preds, labels)["spearman"] == pytest.approx(0.8)


def test_unknown_metric() -> None:
    with pytest.raises(ValueError, match="valid: accuracy"):
        compute_metrics("bleu", np.zeros((2, 2)), np.zeros(2))


def test_constant_baseline_is_the_best_single_answer() -> None:
    from experiments.metrics import constant_baseline

    labels = np.array([1, 1, 0])  # always 1: precision 2/3, recall 1
    assert constant_baseline("f1", labels) == pytest.approx({"f1": 0.8, "accuracy": 2 / 3, "main": 0.8})
    assert constant_baseline("accuracy", np.array([0, 1, 1, 1]))["main"] == 0.75
    assert constant_baseline("matthews_correlation", labels)["main"] == 0.0 and constant_baseline("pearson", np.array([0.5, 4.0]))["main"] == 0.0


def test_constant_baseline_on_the_embedded_rte_dev_set_is_the_published_majority_rate() -> None:
    from experiments.config import task_config
    from experiments.data import load_split
    from experiments.metrics import constant_baseline

    task = task_config("rte")
    labels = np.asarray(load_split(task, task.eval_split, None)[task.label_field])
    assert len(labels) == 277 and round(constant_baseline("accuracy", labels)["main"] * 100, 1) == 52.7
