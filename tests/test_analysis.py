"""Analysis code on runs made by the tests: the ablation table, the core-region plot, the bench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.ablation import ablation_table
from analysis.collect import load_runs
from analysis.core_map import plot_core_map
from experiments.bench import BenchRow, plan, to_markdown
from experiments.runner import run
from experiments.config import compose
from experiments.storage import write_config, write_results


def fake_result(root: Path, task: str, seed: int, score: float, gamma: float = 0.5) -> None:
    write_results(
        root / f"{task}-{gamma}-{seed}",
        {
            "task": task, "method": "taso", "budget": "r1", "seed": seed, "status": "completed",
            "metrics": {"main": score},
            "taso": {"scope": "per_matrix", "granularity": "rows+cols", "importance": "grad_x_weight", "rank": 8, "lr_gamma": gamma},
        },
    )


def fake_failure(root: Path, task: str, seed: int) -> None:
    """A failed run as the runner leaves it: its config, and results.json without options."""
    run_dir = root / f"{task}-failed-{seed}"
    write_config(run_dir, compose(["method=taso", f"task={task}", f"seed={seed}"]))
    write_results(run_dir, {"task": task, "method": "taso", "budget": "r1", "seed": seed, "status": "failed"})


def test_ablation_table_mean_std_and_failed_runs(tmp_path: Path) -> None:
    fake_result(tmp_path, "rte", 0, 0.60)
    fake_result(tmp_path, "rte", 1, 0.70)
    fake_result(tmp_path, "mrpc", 0, 0.80)
    fake_failure(tmp_path, "mrpc", 1)
    table = ablation_table(load_runs(tmp_path)).text
    row = table.loc["taso r1 scope=per_matrix R=8 gamma=0.5"]
    assert row["rte"] == "65.0 ± 7.1"  # std of 60 and 70 (ddof 1)
    assert row["mrpc"] == "80.0 (1/2, 1 failed)"  # the failed seed is not averaged in
    assert row["Avg"] == "72.5†"


def test_half_written_results_are_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"task": "rte", "metr')
    with pytest.raises(ValueError, match="not a complete results file"):
        load_runs(tmp_path)


@pytest.mark.slow
def test_core_map_plot_from_a_taso_run(make_cfg, tmp_path: Path) -> None:
    for save_importance in (False, True):
        cfg = make_cfg("method=taso", "method.importance_batches=2", f"method.save_importance={save_importance}")
        run_dir = tmp_path / f"taso-{save_importance}"
        run(cfg, run_dir)
        written = plot_core_map(run_dir, None, tmp_path / f"map-{save_importance}")
        assert [p.suffix for p in written] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in written)
    with pytest.raises(KeyError, match="no matrix 'nope'"):
        plot_core_map(run_dir, "nope", tmp_path / "x")


def test_bench_plan_and_table() -> None:
    assert plan(["bitfit", "full", "lora", "taso"]) == [("bitfit", "r1"), ("full", "r1"), ("lora", "r1"), ("lora", "r8"), ("taso", "r1")]
    rows = [BenchRow("taso", "r1", 896, 0.55, 1.1, 12.0, 2.0, 0.05, ratio_min=1.05, ratio_max=1.2)]
    text = to_markdown(rows, [0.49, 0.51], precision="bf16")
    assert "| taso | r1 | 896 |  | 0.550 | 1.100x | [1.050, 1.200] | 12 | 5.0% |" in text
    assert "Precision bf16; ratio = median over 2 rounds" in text and "per round (s): 0.490, 0.510" in text