"""Results tables, plots and the results notebook, on results.json files written by the
tests (no training): cells checked against hand-computed numbers."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from analysis.collect import load_runs
from analysis.plots import plot_all
from analysis.render import to_latex, to_markdown
from analysis.tables import main as tables_main
from analysis.tables import results_tables
from analysis.wandb_runs import wandb_record
from experiments.methods import budgeted
from experiments.storage import write_results

ROOT = Path(__file__).resolve().parents[1]
METRIC = {"rte": "accuracy", "mrpc": "f1"}


def write_run(root: Path, task: str, method: str, seed: int, score: float | None, budget: str = "r1", **extra: Any) -> Path:
    """A results.json as the runner writes it; ``score=None`` writes a failed run."""
    record = {"task": task, "method": method, "budget": budget, "budget_rank": int(budget[1:]), "model": "minilm", "seed": seed}
    if score is None:
        record.update(status="failed", error="boom")
    else:
        record.update(
            status="completed", metric=METRIC[task], metrics={"accuracy": 0.0, "main": 0.0, METRIC[task]: score},
            trainable_params=100_000, head_params=1_000, total_params=1_001_000, step_time_s=0.2,
        )
        record.update(extra)
    return write_results(root / task / "minilm" / f"{method}-{budget}" / f"seed{seed}-default", record)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """lora@r1: three seeds on both tasks. taso@r1: rte seed 2 failed, mrpc seed 1 missing.
    bitfit (no budget: its row is the method alone): rte only."""
    root = tmp_path / "runs"
    for seed, (rte, mrpc) in enumerate([(0.70, 0.80), (0.72, 0.84), (0.74, 0.82)]):
        write_run(root, "rte", "lora", seed, rte)
        write_run(root, "mrpc", "lora", seed, mrpc)
    write_run(root, "rte", "taso", 0, 0.76, effective_params=60_000)
    write_run(root, "rte", "taso", 1, 0.78, effective_params=60_000)
    write_run(root, "rte", "taso", 2, None)
    write_run(root, "mrpc", "taso", 0, 0.79, effective_params=60_000)
    write_run(root, "mrpc", "taso", 2, 0.81, effective_params=60_000)
    write_run(root, "rte", "bitfit", 0, 0.60, step_time_s=0.1)
    return root


def test_cells_avg_and_best(runs: Path) -> None:
    table = results_tables(load_runs(runs))["minilm"]
    lora, taso, bitfit = (table.text.loc[m] for m in ("lora@r1", "taso@r1", "bitfit"))
    assert lora["RTE (Acc)"] == "72.0 ± 2.0"  # mean of 70, 72, 74; std (ddof 1) = 2
    assert lora["MRPC (F1)"] == "82.0 ± 2.0"  # the metric the run names (f1), not accuracy or main
    assert lora["Avg"] == "77.0"  # (72 + 82) / 2
    assert taso["RTE (Acc)"] == "77.0 ± 1.4 (2/3, 1 failed)"  # the failed seed is not averaged
    assert taso["MRPC (F1)"] == "80.0 ± 1.4 (2/3)"  # seed 1 missing
    assert taso["Avg"] == "78.5†"  # averages incomplete cells: marked
    assert bitfit["RTE (Acc)"] == "60.0 (1/3)" and bitfit["MRPC (F1)"] == "— (0/3)" and bitfit["Avg"] == "—"
    assert lora["Params (%)"] == "100.0K (10%)" and taso["Params (%)"] == "60.0K eff. / 100.0K (6%)"
    markdown = to_markdown(table)
    assert "**77.0 ± 1.4 (2/3, 1 failed)**" in markdown and "**82.0 ± 2.0**" in markdown and "**78.5†**" in markdown
    assert "† averages cells short of seeds: missing, or diverged, failed, undefined" in markdown


def test_latex_is_booktabs_with_bold_best(runs: Path) -> None:
    latex = to_latex(results_tables(load_runs(runs))["minilm"])
    assert all(rule in latex for rule in (r"\toprule", r"\midrule", r"\bottomrule"))
    assert r"\textbf{82.0 $\pm$ 2.0}" in latex and r"(10\%)" in latex and "lora@r1 &" in latex


def test_other_overrides_are_their_own_row_and_a_run_recorded_twice_is_refused(runs: Path) -> None:
    (runs / "rte/minilm/lora-r1/seed0-default").rename(runs / "rte/minilm/lora-r1/seed0-3fa2c1d0")
    assert "lora@r1 [3fa2c1d0]" in results_tables(load_runs(runs))["minilm"].text.index
    write_run(runs / "copy", "rte", "lora", 1, 0.70)
    with pytest.raises(ValueError, match="more than once"):
        results_tables(load_runs(runs))


def test_cli_writes_tables_and_plots(runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    regions = runs / "rte" / "minilm" / "taso-r1" / "seed0-default"
    save_file({"layer.q.rows": torch.tensor([1, 3]), "layer.q.cols": torch.tensor([0, 2]),
               "layer.q.row_scores": torch.rand(6), "layer.q.col_scores": torch.rand(6)}, str(regions / "core_regions.safetensors"))
    monkeypatch.setattr(sys, "argv", ["tables", "--runs", str(runs)])
    tables_main()
    out = capsys.readouterr().out
    assert "| lora@r1  |" in out and "| bitfit   |" in out  # a method without a budget: named alone
    assert sorted(p.name for p in (runs / "tables").iterdir()) == ["minilm.csv", "minilm.md", "minilm.tex"]
    written = plot_all(load_runs(runs), runs / "plots")
    stems = sorted({p.stem for p in written})
    assert stems == ["minilm_core_map", "minilm_score_vs_params", "minilm_step_cost"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_wandb_run_as_a_record() -> None:
    config = {"task": {"name": "rte", "metric": "accuracy"}, "method": {"name": "lora"}, "budget": {"name": "r1", "rank": 1},
              "model": {"name": "minilm"}, "seed": 2}
    record = wandb_record(config, {"eval/accuracy": 0.7, "train/loss": 0.3}, "crashed", "me/proj/abc")
    assert record["metrics"] == {"accuracy": 0.7} and record["status"] == "failed" and record["seed"] == 2


def test_notebook_regenerates_tables_and_plots(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("TASO_RUNS", str(runs))
    monkeypatch.setenv("TASO_DOCS_OUT", str(runs / "docs"))  # the published tables: not over docs/
    notebook = nbformat.read(ROOT / "analysis" / "results.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    assert (runs / "tables" / "minilm.tex").is_file() and (runs / "plots" / "minilm_score_vs_params.pdf").is_file()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("lora@r1" in o.get("data", {}).get("text/markdown", "") for o in outputs)


def test_diverged_seeds_are_shown_as_diverged_not_failed(runs: Path) -> None:
    folder = runs / "rte" / "minilm" / "bitfit-r1" / "seed1-default"
    write_results(folder, {"task": "rte", "method": "bitfit", "budget": "r1", "budget_rank": 1, "model": "minilm", "seed": 1,
                           "status": "diverged", "diverged_at_step": 1, "error": "loss nan"})
    bitfit = results_tables(load_runs(runs))["minilm"].text.loc["bitfit"]
    assert bitfit["RTE (Acc)"] == "60.0 (1/3, 1 diverged)"


def test_a_completed_seed_without_a_score_is_shown_as_undefined_not_missing(runs: Path) -> None:
    write_run(runs, "rte", "bitfit", 1, math.nan)  # constant predictions: Pearson-like metrics are NaN
    table = results_tables(load_runs(runs))["minilm"]
    assert table.text.loc["bitfit"]["RTE (Acc)"] == "60.0 (1/3, 1 undefined)"
    assert any(note.startswith("undefined:") for note in table.notes)


def test_reference_rows_come_first(runs: Path) -> None:
    root = runs
    write_run(root, "rte", "head_only", 0, 0.58, trainable_params=0)
    write_run(root, "rte", "zero_shot", 0, 0.47, trainable_params=0, head_params=0)
    table = results_tables(load_runs(root))["minilm"]
    assert list(table.text.index[:3]) == ["zero_shot", "head_only", "bitfit"]
    assert table.text.loc["zero_shot", "RTE (Acc)"] == "47.0 (1/3)"


def test_a_method_without_a_budget_is_named_alone_unless_its_runs_have_several(runs: Path) -> None:
    assert not budgeted("bitfit") and not budgeted("full") and budgeted("lora") and budgeted("taso")
    assert budgeted("a_method_this_checkout_lacks")  # an unknown method keeps its budget
    write_run(runs, "rte", "bitfit", 0, 0.62, budget="r8")  # the same training, filed under another budget
    table = results_tables(load_runs(runs))["minilm"]
    assert "bitfit" not in table.text.index  # no row mixes the two budgets' runs
    assert table.text.loc["bitfit@r1", "RTE (Acc)"] == "60.0 (1/3)" and table.text.loc["bitfit@r8", "RTE (Acc)"] == "62.0 (1/3)"
