"""hydra/sweeper=optuna (the optuna extra): a seeded TPE search of the learning-rate factor whose
objective is each selection run's validation-slice score, and never a score on the dev set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest

from experiments.config import ConfigError
from experiments.objective import check_optimisable, objective
from experiments.selection import HOLDOUT_SPLIT, learning_rate
from experiments.storage import read_results
from conftest import fast_configs

TINY = ("model=tiny", "trainer=fast", "logger=none")
OPTUNA = "experiment=glue_minilm_cpu_select_optuna"


@pytest.mark.slow
def test_optuna_sweep_maximises_the_slice_score_that_the_final_stage_compares(cli, glue_dir: Path, tmp_path: Path) -> None:
    runs, storage = tmp_path / "runs", f"sqlite:///{tmp_path / 'optuna.db'}"
    out = cli("-m", OPTUNA, *TINY, "method=lora", f"data.dir={glue_dir}", f"paths.runs={runs}", "hydra.sweeper.n_trials=3",
              f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=rate", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = optuna.load_study(study_name="rate", storage=storage).trials
    records = {r["selection"]["lr_factor"]: r for r in map(read_results, runs.rglob("results.json"))}
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert sorted(t.params["selection.lr_factor"] for t in trials) == sorted(records) and len(records) == 3
    for trial in trials:
        record = records[trial.params["selection.lr_factor"]]
        assert record["selection"]["stage"] == "select" and record["selection"]["eval_split"] == HOLDOUT_SPLIT
        assert 0.25 <= record["selection"]["lr_factor"] <= 32 and trial.value == record["metrics"]["main"]
    # the final stage chooses among these off-grid factors, by the score the trials returned
    final = fast_configs(glue_dir, tmp_path / "final")(
        "experiment=glue_minilm_cpu", *TINY, "method=lora", f"selection.from_runs={runs}", "selection.extend_edges=false"
    )
    rate = learning_rate(final)
    assert rate.candidates == 3 and records[rate.factor]["metrics"]["main"] == max(t.value for t in trials)


@pytest.mark.slow  # a run.py process with the sweeper's imports: ~25 s; the refusal itself is unit-tested below
def test_optuna_refuses_a_final_run_before_training(cli, glue_dir: Path, tmp_path: Path) -> None:
    out = cli("-m", OPTUNA, *TINY, f"data.dir={glue_dir}", f"paths.runs={tmp_path}", "selection.stage=final", cwd=tmp_path)
    assert out.returncode != 0 and "scored on the dev set the tables report" in out.stderr
    assert not list(tmp_path.rglob("results.json"))


def test_only_holdout_selection_runs_may_be_optimised(make_cfg) -> None:
    check_optimisable(make_cfg("selection.stage=select"))
    for overrides in (("selection.stage=final",), ("selection.stage=select", "selection.rule=dev")):
        with pytest.raises(ConfigError, match="selection.rule=holdout"):
            check_optimisable(make_cfg(*overrides))


@pytest.mark.parametrize("status, main, expected", [("completed", 0.75, 0.75), ("completed", math.nan, -math.inf), ("diverged", None, -math.inf)])
def test_objective_is_the_final_score_and_never_picks_a_run_without_one(tmp_path: Path, status: str, main, expected: float) -> None:  # noqa: ANN001
    record = {"status": status, **({"metrics": {"main": main}} if main is not None else {})}
    (tmp_path / "results.json").write_text(json.dumps(record))
    assert objective(tmp_path / "results.json") == expected
