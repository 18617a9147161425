"""analysis.precision: the same seeds in fp32 and bf16, paired."""

from __future__ import annotations

from pathlib import Path

import pytest
from scipy.stats import ttest_rel

from analysis.collect import load_runs
from analysis.precision import precision_table
from experiments.storage import write_results


def result(root: Path, precision: str, seed: int, score: float, method: str = "taso") -> None:
    write_results(
        root / precision / f"{method}-{seed}",
        {"model": "minilm", "task": "mrpc", "method": method, "budget": "r1", "seed": seed, "status": "completed",
         "precision": precision, "metric": "f1", "metrics": {"f1": score, "main": score}},
    )


def test_seeds_are_paired_across_precisions_and_unpaired_runs_left_out(tmp_path: Path) -> None:
    fp32, bf16 = [0.80, 0.82, 0.84], [0.81, 0.84, 0.84]
    for seed, (a, b) in enumerate(zip(fp32, bf16)):
        result(tmp_path, "fp32", seed, a)
        result(tmp_path, "bf16", seed, b)
    result(tmp_path, "bf16", 3, 0.10)  # no fp32 twin: not in the comparison
    result(tmp_path, "bf16", 0, 0.50, method="lora")  # another cell with no fp32 run
    table = precision_table(load_runs(tmp_path))
    assert len(table) == 1
    row = table.iloc[0]
    assert row["seeds"] == "0,1,2"
    assert row["fp32"] == "82.0 ± 2.0" and row["bf16"] == "83.0 ± 1.7"
    assert row["bf16 - fp32"] == "+1.0"
    assert row["paired t-test p"] == f"{ttest_rel([81, 84, 84], [80, 82, 84]).pvalue:.2f}"


def test_a_single_precision_is_refused(tmp_path: Path) -> None:
    result(tmp_path, "bf16", 0, 0.8)
    with pytest.raises(ValueError, match="one other precision"):
        precision_table(load_runs(tmp_path))
