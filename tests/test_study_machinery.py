"""Study machinery: protocols, learning-rate selection, best epoch, significance, the results
store, published tables and the cost estimate."""

from __future__ import annotations

import json
import math
import shutil
import threading
import warnings
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy.stats import ttest_1samp, ttest_ind

from analysis.environment import environment_table
from analysis.publish import published_docs, regenerate, stale_docs, strip_tables
from analysis.significance import HIGHER, LOWER, detectable_difference, fdr_adjusted, significance_marks, welch_p
from analysis.store import load_store, read_store, refresh_store, restore_runs, store_lock, store_path
from analysis.study import NOT_LEARNED, Epoch, comparison_table, selection_table, study_table
from experiments.config import compose
from experiments.edges import owed_runs
from experiments.estimate import estimate, measured_step_times
from experiments.run_study import main, run_study
from experiments.runner import provenance, run
from experiments.selection import best_epoch_metrics, cell_folder, holdout_split, learning_rate, owed_factor
from experiments.storage import atomic_write_text, exclusive_lock, read_results, stale_provenance, write_config, write_results

ROOT = Path(__file__).resolve().parent.parent


# --- protocols -----------------------------------------------------------------------------

def test_paper_protocols_pick_each_tasks_row() -> None:
    mrpc = compose(["protocol=lora_roberta_base", "task=mrpc"])
    cola = compose(["protocol=lora_roberta_base", "task=cola"])
    assert (mrpc.trainer.epochs, mrpc.trainer.lr, mrpc.trainer.batch_size, mrpc.task.max_length) == (30, 4e-4, 16, 512)
    assert (cola.trainer.epochs, cola.trainer.lr, cola.trainer.batch_size) == (80, 4e-4, 32)
    stsb = compose(["protocol=adalora_deberta_v3_base", "task=stsb"])
    assert (stsb.trainer.lr, stsb.trainer.epochs, stsb.task.max_length, stsb.protocol.published_for) == (2.2e-3, 25, 128, "adalora")


def test_cpu_protocol_trains_rte_cola_and_mrpc_ten_epochs_and_the_others_three() -> None:
    """docs/protocols.md: 3 epochs left RTE, CoLA and MRPC under-trained (their schedules)."""
    epochs = {t: compose(["protocol=cpu", f"task={t}"]).trainer.epochs for t in ("rte", "cola", "mrpc", "stsb")}
    assert epochs == {"rte": 10, "cola": 10, "mrpc": 10, "stsb": 3}


def test_command_line_wins_over_protocol_and_default_protocol_changes_nothing() -> None:
    assert compose(["protocol=lora_roberta_base", "task=rte", "trainer.epochs=2"]).trainer.epochs == 2
    plain, default = compose(["trainer=fast"]), compose(["trainer=fast", "protocol=default"])
    assert OmegaConf.to_container(plain.trainer) == OmegaConf.to_container(default.trainer)
    assert plain.task.max_length == default.task.max_length


def test_protocol_without_values_for_a_task_names_it() -> None:
    with pytest.raises(Exception, match="sets no 'epochs' for task 'boolq'"):
        OmegaConf.to_container(compose(["protocol=lora_roberta_base", "task=boolq"]), resolve=True)


# --- selection -----------------------------------------------------------------------------

def test_holdout_slice_is_seeded_disjoint_and_stratified() -> None:
    labels = [0] * 80 + [1] * 20
    ds = datasets.Dataset.from_dict({"x": list(range(100)), "label": labels})
    rest, held = holdout_split(ds, 0.2, seed=0, label_field="label", stratify=True)
    assert len(held) == 20 and set(rest["x"]).isdisjoint(held["x"]) and len(rest) + len(held) == 100
    assert Counter(held["label"]) == {0: 16, 1: 4}
    assert holdout_split(ds, 0.2, seed=0, label_field="label", stratify=True)[1]["x"] == held["x"]
    assert holdout_split(ds, 0.2, seed=1, label_field="label", stratify=True)[1]["x"] != held["x"]
    with pytest.raises(ValueError, match="holdout_fraction"):
        holdout_split(ds, 1.0, seed=0, label_field="label", stratify=True)


def test_best_epoch_is_the_highest_evaluation() -> None:
    history = [{"epoch": 1.0, "step": 5, "eval_main": 0.6, "eval_f1": 0.6, "eval_runtime": 1.0},
               {"epoch": 2.0, "step": 10, "eval_main": 0.8, "eval_f1": 0.8},
               {"epoch": 3.0, "step": 15, "eval_main": 0.7, "eval_f1": 0.7}]
    assert best_epoch_metrics(history, {"main": 0.7}) == {"main": 0.8, "f1": 0.8, "epoch": 2.0, "step": 10}
    assert best_epoch_metrics([], {"main": 0.7}) == {"main": 0.7}
    # a first evaluation without a score (constant predictions: Pearson NaN) won before, as max() keeps a NaN first
    unscored = [{"epoch": 1.0, "step": 5, "eval_main": math.nan}, *history[1:]]
    assert best_epoch_metrics(unscored, {"main": 0.7})["main"] == 0.8
    assert math.isnan(best_epoch_metrics(unscored[:1], {"main": math.nan})["main"])  # none scored: the first


def selection_dir(runs: Path, cfg, name: str) -> Path:
    return cell_folder(cfg, runs) / name


def test_selection_then_final_run_end_to_end(make_cfg, tmp_path: Path) -> None:
    select_runs = tmp_path / "select"
    scores = {}
    for factor in (1, 4):
        cfg = make_cfg("method=lora", "selection.stage=select", f"selection.lr_factor={factor}")
        record = read_results(run(cfg, selection_dir(select_runs, cfg, f"f{factor}")))
        assert record["selection"]["eval_split"] == "train_holdout" and record["lr"] == pytest.approx(5e-4 * factor)
        assert (record["train_samples"], record["eval_samples"]) == (21, 3)  # 24 training rows, 10% held out
        scores[factor] = record["metrics"]["main"]
    # another protocol's selection runs are not candidates
    other = make_cfg("method=lora", "selection.stage=select", "selection.lr_factor=0.25", "protocol=cpu", "trainer.max_steps=4")
    assert read_results(run(other, selection_dir(select_runs, other, "other")))["protocol"] == "cpu"
    # nor are runs of the same protocol under another schedule (a task's epochs changed since)
    longer = make_cfg("method=lora", "selection.stage=select", "selection.lr_factor=16", "trainer.max_steps=6")
    assert read_results(run(longer, selection_dir(select_runs, longer, "longer")))["status"] == "completed"
    final = make_cfg("method=lora", f"selection.from_runs={select_runs}")
    expected = max(scores, key=lambda f: (scores[f], -abs(math.log(f)), -f))
    assert learning_rate(final).factor == expected and learning_rate(final).candidates == 2
    record = read_results(run(final, tmp_path / "final"))
    assert record["selection"]["eval_split"] == "validation" and record["eval_samples"] == 12
    assert record["lr"] == pytest.approx(5e-4 * expected) and record["metrics_best"]["main"] >= record["metrics"]["main"] - 1e-12


def test_final_run_without_selection_runs_fails_before_training(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run the selection stage first"):
        learning_rate(make_cfg("method=lora", f"selection.from_runs={tmp_path}"))


@pytest.mark.parametrize("order", [("a", "b", "c"), ("c", "b", "a")])
def test_a_diverged_factor_never_wins_whatever_the_folder_order(make_cfg, tmp_path: Path, order: tuple[str, ...]) -> None:
    """A NaN score (a run whose predictions went constant or non-finite) compares false with
    everything, so max() kept it whenever it came first; it must lose in any order."""
    cfg = make_cfg("method=lora", "selection.stage=select")
    fake_selection_runs(tmp_path, cfg, dict(zip(order, [(16.0, math.nan), (4.0, 0.40), (1.0, 0.05)])))
    assert learning_rate(make_cfg("method=lora", f"selection.from_runs={tmp_path}")).factor == 4.0


def test_selection_runs_of_several_seeds_are_averaged_per_factor(make_cfg, tmp_path: Path) -> None:
    """docs/protocols.md's stricter selection: 4x wins on one seed, but another seed stuck at
    the constant answer brings its mean under 1x's."""
    cfg = make_cfg("method=lora", "selection.stage=select")
    fake_selection_runs(tmp_path, cfg, {"s0-4x": (4.0, 0.30), "s0-1x": (1.0, 0.29)})
    assert learning_rate(make_cfg("method=lora", f"selection.from_runs={tmp_path}")).factor == 4.0
    fake_selection_runs(tmp_path, cfg, {"s1-4x": (4.0, 0.0), "s1-1x": (1.0, 0.25)})
    assert learning_rate(make_cfg("method=lora", f"selection.from_runs={tmp_path}")).factor == 1.0


def fake_selection_runs(root: Path, cfg, runs: dict[str, tuple[float, float]]) -> None:
    """Completed selection runs of ``cfg``'s cell under ``root``: folder -> (factor, score)."""
    where = cell_folder(cfg, root)
    for folder, (factor, score) in runs.items():
        (where / folder).mkdir(parents=True)
        OmegaConf.save(cfg, where / folder / "config.yaml")
        sel = {"stage": "select", "rule": "holdout", "lr_factor": factor}
        (where / folder / "results.json").write_text(json.dumps(
            {"status": "completed", "selection": sel, "protocol": cfg.protocol.name, "model": cfg.model.name, "metrics": {"main": score}}))


@pytest.mark.parametrize(
    ("means", "owed"),
    [
        ({1.0: 0.7, 4.0: 0.5, 16.0: math.nan}, 0.25),  # the smallest wins: one step down
        ({1.0: 0.2, 4.0: 0.3, 16.0: 0.4}, 64.0),  # the largest wins: one step up
        ({0.25: 0.6, 1.0: 0.7, 4.0: 0.5, 16.0: 0.1}, None),  # bracketed
        ({0.25: 0.8, 1.0: 0.7, 4.0: 0.5}, 0.0625),  # the extension won: one more step
        ({1.0: 0.7}, None),  # one factor: no grid step to extend by
        ({1.0: math.nan, 4.0: math.nan}, None),  # nothing learned: no best to bracket
    ],
)
def test_a_best_factor_at_the_grid_edge_owes_the_next_one(means: dict[float, float], owed: float | None) -> None:
    assert owed_factor(means) == owed


def test_with_extend_edges_a_final_run_waits_for_the_factor_its_edge_winner_owes(make_cfg, glue_dir: Path, tmp_path: Path) -> None:
    select = make_cfg("method=lora", "selection.stage=select")
    fake_selection_runs(tmp_path, select, {"a": (1.0, 0.7), "b": (4.0, 0.5), "c": (16.0, 0.1)})
    final = [f"selection.from_runs={tmp_path}", "method=lora"]
    assert learning_rate(make_cfg(*final)).factor == 1.0  # the default takes the edge winner
    with pytest.raises(ValueError, match=r"edge of those tried \(1x, 4x, 16x\).*selection run at 0.25x"):
        learning_rate(make_cfg(*final, "selection.extend_edges=true"))
    sweep = ["model=tiny", "trainer=fast", "logger=none", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", "selection.stage=select"]
    # each owed run as one run.py line; zero_shot has no rate, a cell without runs owes nothing yet
    assert owed_runs([*sweep, "method=lora,zero_shot,bitfit", "seed=0,1"]) == [" ".join([*sweep, "method=lora", "selection.lr_factor=0.25"])]
    fake_selection_runs(tmp_path, select, {"d": (0.25, 0.6)})
    rate = learning_rate(make_cfg(*final, "selection.extend_edges=true"))
    assert (rate.factor, rate.candidates) == (1.0, 4)
    assert owed_runs([*sweep, "method=lora"]) == []


def test_a_final_run_records_its_chosen_rate_and_is_stale_when_the_choice_moves(make_cfg, tmp_path: Path) -> None:
    select = make_cfg("method=lora", "selection.stage=select")
    fake_selection_runs(tmp_path, select, {"a": (1.0, 0.5), "b": (4.0, 0.7)})
    final = make_cfg("method=lora", f"selection.from_runs={tmp_path}")
    before = provenance(final)
    assert before["lr"] == pytest.approx(4 * 5e-4) and provenance(select).keys() == {"run_id", "fingerprints"}
    finished = {**before, "status": "completed"}
    assert stale_provenance(finished, before) == []
    fake_selection_runs(tmp_path, select, {"c": (16.0, 0.9)})  # the choice moves to 16x: same identity, other rate
    after = provenance(final)
    assert after["run_id"] == before["run_id"] and stale_provenance(finished, after) == ["learning rate"]


def test_a_method_that_trains_nothing_needs_no_selection_runs(make_cfg, tmp_path: Path) -> None:
    """zero_shot sits in a final-stage sweep beside the trained methods: no rate to choose."""
    rate = learning_rate(make_cfg("method=zero_shot", f"selection.from_runs={tmp_path}"))
    assert (rate.lr, rate.factor, rate.candidates) == (0.0, 1.0, 0)


# --- significance, store, study table --------------------------------------------------------

def record(method: str, seed: int, score: float, best: float, lr: float, stage: str = "final", task: str = "rte") -> dict:
    return {"task": task, "method": method, "budget": "r1", "budget_rank": 1, "model": "minilm", "seed": seed,
            "protocol": "cpu", "status": "completed", "metric": "accuracy", "lr": lr,
            "metrics": {"main": score, "accuracy": score}, "metrics_best": {"main": best, "accuracy": best, "epoch": 1.0},
            "selection": {"stage": stage, "rule": "holdout", "lr_factor": 1.0, "factors_compared": 3 if stage == "final" else 0},
            "eval_history": [{"eval_main": score}]}


def test_welch_marks_need_three_seeds_and_a_real_difference() -> None:
    rows = [("ref", 0.50), ("ref", 0.51), ("ref", 0.49), ("up", 0.70), ("up", 0.71), ("up", 0.69),
            ("same", 0.52), ("same", 0.48), ("same", 0.50), ("few", 0.9), ("few", 0.91), ("down", 0.30), ("down", 0.31), ("down", 0.29)]
    scores = pd.DataFrame([{"row": r, "task": "rte", "score": s} for r, s in rows])
    marks = significance_marks(scores, "row", "ref")
    assert marks.loc["up", "rte"] == HIGHER and marks.loc["down", "rte"] == LOWER
    assert "same" not in marks.index and "few" not in marks.index


def write_runs(root: Path, records: list[dict]) -> None:
    for r in records:
        folder = root / r["task"] / r["model"] / f"{r['method']}-{r['budget']}" / f"seed{r['seed']}-{r['selection']['stage']}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(r))


def test_store_refresh_replaces_runs_read_again_and_keeps_evaluation_scores_only(tmp_path: Path) -> None:
    runs = tmp_path / "study"
    timed = lambda r: {**r, "eval_history": [{**r["eval_history"][0], "eval_runtime": 2.0}], "train_loss_history": [0.9]}  # noqa: E731
    write_runs(runs, [timed(record("lora", s, 0.5, 0.6, 1e-3)) for s in range(3)])
    path = refresh_store("study", [runs], tmp_path / "results")
    shutil.rmtree(runs)
    write_runs(runs, [timed(record("lora", 0, 0.7, 0.7, 1e-3)), timed(record("taso", 0, 0.8, 0.8, 1e-3))])
    refresh_store("study", [runs], tmp_path / "results")
    stored = read_store(path)
    assert [r["run"] for r in stored] == sorted(r["run"] for r in stored) and len(stored) == 4
    assert {r["run"]: r["metrics"]["main"] for r in stored}["study/rte/minilm/lora-r1/seed0-final"] == 0.7
    assert all(r["store_schema"] == 3 and r["config"] is None for r in stored)  # no config.yaml here
    # the evaluations' scores stay (the best epoch can be derived again), their timings and the loss history go
    assert all(r["eval_history"] == [{"eval_main": r["metrics"]["main"]}] and "train_loss_history" not in r for r in stored)
    refresh_store("study", [], tmp_path / "results", drop=("*/taso-r1/*",))  # a retired protocol's runs
    assert sorted(r["run"] for r in read_store(path)) == [f"study/rte/minilm/lora-r1/seed{s}-final" for s in range(3)]


def test_store_refreshes_take_turns_so_none_drops_the_others_lines(tmp_path: Path) -> None:
    """Two study commands side by side refresh one store: the second waits for the first's lock,
    then reads what the first wrote (the lock held here stands in for the first refresh)."""
    write_runs(tmp_path / "a", [record("lora", 0, 0.5, 0.6, 1e-3)])
    write_runs(tmp_path / "b", [record("taso", 0, 0.7, 0.7, 1e-3)])
    path = store_path("study", tmp_path / "results")
    first = read_store(refresh_store("study", [tmp_path / "a"], tmp_path / "other"))
    with exclusive_lock(store_lock(path)):
        second = threading.Thread(target=refresh_store, args=("study", [tmp_path / "b"], tmp_path / "results"))
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive() and not path.exists()  # waiting for the lock, nothing written
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in first))  # the first refresh's write
    second.join(timeout=30)
    assert not second.is_alive()
    assert sorted(r["method"] for r in read_store(path)) == ["lora", "taso"]


def test_a_study_resumes_from_its_store_restored_on_another_machine(make_cfg, tmp_path: Path) -> None:
    """Store selection and final runs, delete the run folders, restore them from the store:
    the final run reads the same rate from the restored selection runs and is skipped."""
    runs = tmp_path / "runs"
    for factor in (1, 4):
        cfg = make_cfg("method=lora", "selection.stage=select", f"selection.lr_factor={factor}")
        run(cfg, selection_dir(runs / "select", cfg, f"f{factor}"))
    final = make_cfg("method=lora", f"selection.from_runs={runs / 'select'}")
    chosen, results = learning_rate(final), read_results(run(final, runs / "final" / "seed0"))
    path = refresh_store("study", [runs / "select", runs / "final"], tmp_path / "results")
    stored = read_store(path)
    assert all(r["config"]["method"]["name"] == "lora" for r in stored)
    shutil.rmtree(runs)
    written, without_config = restore_runs(path, runs)
    assert len(written) == 3 and without_config == []
    assert learning_rate(final) == chosen
    final_results = runs / "final" / "seed0" / "results.json"
    restored = final_results.stat().st_mtime_ns
    assert run(final, runs / "final" / "seed0") == final_results and final_results.stat().st_mtime_ns == restored  # skipped
    assert read_results(final_results)["metrics"] == results["metrics"]
    assert restore_runs(path, runs) == ([], [])  # what is there is left as it is
    refresh_store("study", [runs / "select", runs / "final"], tmp_path / "results")
    assert read_store(path) == stored  # store -> run folders -> store gives the same lines


@pytest.mark.parametrize(
    "overrides, refusal",
    [(["task=rte"], "name one study: experiment=<name>"),
     (["experiment=glue_minilm_cpu_select"], r"glue_minilm_cpu_select_select.yaml, its selection stage"),
     (["experiment=glue_minilm_cpu", "method=lora,lorra"], r"unknown method\(s\) lorra; registered: .*lora")],
)
def test_run_study_refuses_a_command_without_a_study_before_running_anything(overrides: list[str], refusal: str, monkeypatch) -> None:
    monkeypatch.setattr("experiments.run_study.run_command", lambda args: pytest.fail(f"ran {args}"))
    with pytest.raises(ValueError, match=refusal):
        run_study([*overrides, "selection.from_runs=runs/x"])


def test_run_study_runs_jobs_at_a_time_and_takes_options_among_launcher_overrides(monkeypatch) -> None:
    """``--jobs`` sets the sweeps' n_jobs; a ``hydra.launcher.*`` override composes (it failed
    against the basic launcher) and stays out of the owed single runs; ``--jobs`` may come
    anywhere among the overrides (it was refused after them); ``seed=`` goes to the final runs
    alone (further seeds must not re-run the selection, or choose its rate from their mean)."""
    commands: list[list[str]] = []
    asked: list[list[str]] = []
    monkeypatch.setattr("experiments.run_study.run_command", commands.append)
    monkeypatch.setattr("experiments.run_study.owed_runs", lambda cell: asked.append(cell) or [])
    monkeypatch.setattr("experiments.run_study.refresh", lambda *args: None)
    monkeypatch.setattr("sys.argv", ["run_study", "experiment=glue_minilm_cpu", "--jobs", "1", "task=rte",
                                     "method=lora", "hydra.launcher.verbose=1", "trainer.num_threads=1", "seed=3,4"])
    main()
    launcher = ["-m", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=1"]
    rest = ["hydra.launcher.verbose=1", "trainer.num_threads=1"]
    assert commands == [[*launcher, "experiment=glue_minilm_cpu_select", "task=rte", "method=lora", *rest],
                        [*launcher, "experiment=glue_minilm_cpu", "task=rte", "method=lora", *rest, "seed=3,4"]]
    assert asked == [["experiment=glue_minilm_cpu_select", "task=rte", "method=lora", "trainer.num_threads=1"]]


@pytest.mark.slow
def test_run_study_runs_selection_owed_runs_finals_and_store_then_skips_it_all(glue_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The one-command pipeline on model=tiny: LoRA's selection at {1x, 4x} (a best factor there is
    always at an edge, so it owes one more), zero-shot only in the final stage, 3 seeds each, the
    store; run again, it launches no training and rewrites nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    overrides = ["experiment=smoke_rte", "method=zero_shot,lora", "model=tiny", f"data.dir={glue_dir}", "hydra/launcher=basic"]
    run_study(overrides, jobs=2, store_dir=tmp_path / "results")
    stored = read_store(tmp_path / "results" / "smoke_rte.jsonl")
    select = [r for r in stored if r["selection"]["stage"] == "select"]
    assert {r["method"] for r in select} == {"lora"} and {1.0, 4.0} < {r["selection"]["lr_factor"] for r in select}
    assert owed_runs(["experiment=smoke_rte_select", "task=rte", "method=lora", "model=tiny", f"data.dir={glue_dir}"]) == []
    final = Counter(r["method"] for r in stored if r["selection"]["stage"] == "final")
    assert final == {"zero_shot": 3, "lora": 3} and all(r["status"] == "completed" for r in stored)
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("results.json")}
    run_study(overrides, jobs=2, store_dir=tmp_path / "results")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("results.json")} == written
    assert read_store(tmp_path / "results" / "smoke_rte.jsonl") == stored


def test_study_table_marks_cells_shows_rates_and_the_chosen_epoch(tmp_path: Path) -> None:
    records = [record("lora", s, 0.50 + 0.01 * s, 0.60, 1e-3) for s in range(3)]
    records += [dict(record("taso", s, 0.70 + 0.01 * s, 0.72, 2e-3), taso={"lr_scale": 2.0}) for s in range(3)]  # adapters at 2x
    records += [record("taso", 0, 0.99, 0.99, 8e-3, stage="select")]  # a selection run: not in the table
    for r in records:
        r["metrics_constant"] = {"accuracy": 0.527, "main": 0.527}  # the majority class of this dev set
    runs = tmp_path / "study"
    write_runs(runs, records)
    frame = load_store(refresh_store("study", [runs], tmp_path / "results"))
    table, rates = study_table(frame, "lora@r1")
    assert table.text.loc["taso@r1", "RTE (Acc)"] == f"71.0 ± 1.0 {HIGHER}"
    assert table.text.loc["lora@r1", "RTE (Acc)"] == f"51.0 ± 1.0 {NOT_LEARNED}"  # below the majority rate
    assert "RTE (Acc) 52.7" in table.notes[2]
    assert rates.loc["taso@r1", "RTE (Acc)"] == "2.0e-03 (adapters 4.0e-03)" and rates.loc["lora@r1", "RTE (Acc)"] == "1.0e-03"
    mixed = study_table(frame.assign(lr=frame["lr"].where(frame["seed"] != 1, 5e-4)), "lora@r1")[1]
    assert mixed.loc["lora@r1", "RTE (Acc)"] == "5.0e-04/1.0e-03"  # a cell of several rates: numeric order (text order put 1.0e-03 first)
    assert "final-epoch" in table.notes[0] and "holdout" in table.notes[0] and "Welch" in table.notes[1]
    best, _ = study_table(frame, "lora@r1", Epoch.best)
    assert best.text.loc["lora@r1", "RTE (Acc)"] == "60.0 ± 0.0" and "best-epoch" in best.notes[0]


def test_the_caption_says_whether_rates_were_selected_or_given(tmp_path: Path) -> None:
    """A table of runs at given rates (factors_compared 0: a protocol's published rate) must not
    claim a selection rule (it did); a zero-shot run (rate 0) among selected ones has no rate
    (its rate cell says it trained nothing)."""
    selected = [record("lora", s, 0.6, 0.6, 1e-3) for s in range(3)] + [record("zero_shot", s, 0.5, 0.5, 0.0) for s in range(3)]
    for r in selected[3:]:
        r["selection"]["factors_compared"] = 0
    given = [record("lora", s, 0.6, 0.6, 5e-4) for s in range(3)]
    for r in given:
        r["selection"]["factors_compared"] = 0
    captions, rates = {}, {}
    for name, records in (("selected", selected), ("given", given), ("mixed", selected[:3] + [dict(given[0], method="taso")])):
        write_runs(tmp_path / name, records)
        table, rates[name] = study_table(load_store(refresh_store(name, [tmp_path / name], tmp_path / "results")), "lora@r1")
        captions[name] = table.notes[0]
    assert rates["selected"].loc["zero_shot", "RTE (Acc)"] == "not trained"
    assert "rate selected by rule holdout (validation slice" in captions["selected"] and "given" not in captions["selected"]
    assert "rate given, not selected (the protocol's for the task" in captions["given"] and "rule" not in captions["given"]
    assert "where a cell compared rates, else rate given" in captions["mixed"]


def test_a_correlation_just_above_zero_is_not_called_learned(tmp_path: Path) -> None:
    """A constant scores Pearson 0, yet 0.4 is not learning STS-B: the floor is 0.50 (MCC 0.10)."""
    records = []
    for method, level in (("lora", 0.60), ("taso", 0.40)):
        for s in range(3):
            score = level + 0.01 * s
            r = record(method, s, score, score, 1e-3, task="stsb")
            r["metric"], r["metrics"], r["metrics_constant"] = "pearson", {"main": score, "pearson": score}, {"pearson": 0.0, "main": 0.0}
            r["metrics_best"] = {"main": score, "pearson": score, "epoch": 1.0}
            records.append(r)
    write_runs(tmp_path / "study", records)
    table, _ = study_table(load_store(refresh_store("study", [tmp_path / "study"], tmp_path / "results")), "lora@r1")
    column = [c for c in table.text.columns if c.startswith("STSB")][0]
    assert table.text.loc["taso@r1", column].endswith(NOT_LEARNED) and not table.text.loc["lora@r1", column].endswith(NOT_LEARNED)
    assert "STSB (Pearson) 50.0" in table.notes[2]


def test_extra_seeds_on_some_rows_leave_the_others_complete_and_are_named(tmp_path: Path) -> None:
    """The block's seeds=0-2: TASO r1 ran 0-4 (a closer look), LoRA 0-2, BitFit 0 only. LoRA's
    cell stays complete and TASO's counts its five; BitFit is short of the study's three. The
    store's seeds alone (no option) expect all five everywhere."""
    records = [record("taso", s, 0.60 + 0.01 * s, 0.6, 1e-3) for s in range(5)]
    records += [record("lora", s, 0.50 + 0.01 * s, 0.5, 1e-3) for s in range(3)] + [record("bitfit", 0, 0.55, 0.55, 1e-3)]
    write_runs(tmp_path / "study", records)
    refresh_store("study", [tmp_path / "study"], tmp_path / "results")
    block = regenerate("<!-- study-table: study seeds=0-2 -->\n<!-- /study-table -->", tmp_path / "results")
    assert "| **62.0 ± 1.6 ▲** " in block and "| 51.0 ± 1.0 " in block and "| 55.0 (1/3) " in block
    assert "Seeds 0-2 per cell; 0-4 for taso@r1." in block
    table, _ = study_table(load_store(store_path("study", tmp_path / "results")), "lora@r1")
    assert table.text.loc["lora@r1", "RTE (Acc)"] == "51.0 ± 1.0 (3/5)" and not any(n.startswith("Seeds") for n in table.notes)


def test_selection_view_shows_each_factor_and_marks_the_best(tmp_path: Path) -> None:
    records = []
    for factor, score in ((1.0, 0.05), (4.0, 0.40), (16.0, math.nan)):
        r = record("lora", 0, score, score, 5e-4 * factor, stage="select", task="stsb")
        r["selection"]["lr_factor"], r["metric"], r["metrics"] = factor, "pearson", {"main": score, "pearson": score}
        write_runs(tmp_path / "study" / f"f{factor:g}", [r])
    for factor in (0.25, 1.0):  # RTE only, so far; a tie, which the final runs break towards 1x
        r = record("taso", 0, 0.6, 0.6, 5e-4 * factor, stage="select")
        r["selection"]["lr_factor"] = factor
        write_runs(tmp_path / "study" / f"taso{factor:g}", [r])
    folders = [tmp_path / "study" / f for f in ("f1", "f4", "f16", "taso0.25", "taso1")]
    table = selection_table(load_store(refresh_store("study", folders, tmp_path / "results")))
    assert table["STSB (Pearson)"].to_dict() == {
        "lora@r1 1x": "5.0", "lora@r1 4x": "40.0*", "lora@r1 16x": "nan", "taso@r1 0.25x": "—", "taso@r1 1x": "—"
    }
    assert table["RTE (Acc)"].to_dict() == {
        "lora@r1 1x": "—", "lora@r1 4x": "—", "lora@r1 16x": "—", "taso@r1 0.25x": "60.0", "taso@r1 1x": "60.0*"
    }
    # runs whose configs say selection.extend_edges: TASO's best (1x, the largest of 0.25x and 1x) still
    # owes 4x, so no rate is chosen yet (the final runs would refuse); LoRA's 4x lies inside its factors
    for folder in folders:
        for results in folder.rglob("results.json"):
            (results.parent / "config.yaml").write_text("selection:\n  extend_edges: true\n")
    edges = selection_table(load_store(refresh_store("study", folders, tmp_path / "results")))
    assert edges["RTE (Acc)"]["taso@r1 1x"] == "60.0†" and edges["STSB (Pearson)"]["lora@r1 4x"] == "40.0*"
    assert edges.drop(columns="RTE (Acc)").equals(table.drop(columns="RTE (Acc)"))


def test_welch_p_against_seeds_that_all_scored_the_same_is_the_one_sample_test_without_a_warning() -> None:
    constant, learned = [81.22270742358079] * 3, [85.5, 85.2, 84.8]  # MRPC's constant F1, which scipy warns of
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = welch_p(constant, learned)
    assert p == pytest.approx(ttest_1samp(learned, constant[0]).pvalue)


@pytest.mark.parametrize(("n", "sd_a", "sd_b"), [(3, 1.0, 1.0), (3, 0.5, 2.0), (5, 1.0, 1.0)])
def test_detectable_difference_is_found_with_the_stated_power(n: int, sd_a: float, sd_b: float) -> None:
    """Fresh simulated seeds at that true difference and spread: Welch's test finds it in 80% of draws."""
    rng = np.random.default_rng(1)
    spread = [float(x) for x in (-1, 0, 1, 0.5, -0.5)[:n]]  # sample sds scaled to sd_a, sd_b below
    a = [sd_a * x / float(np.std(spread, ddof=1)) for x in spread]
    b = [sd_b * x / float(np.std(spread, ddof=1)) for x in spread]
    mde = detectable_difference(a, b)
    draws = 20000
    p = ttest_ind(rng.normal(mde, sd_a, (draws, n)), rng.normal(0.0, sd_b, (draws, n)), axis=1, equal_var=False).pvalue
    assert (p < 0.05).mean() == pytest.approx(0.8, abs=0.015)
    assert detectable_difference(a + [a[0]] * 5, b + [b[0]] * 5) < mde  # more seeds detect less
    assert detectable_difference(a[:2], b) != detectable_difference(a[:2], b)  # NaN: fewer than 3 seeds
    assert detectable_difference([81.2] * 3, [81.2] * 3) == 0.0


def test_fdr_adjustment_is_benjamini_hochberg_over_the_tests_made() -> None:
    # step-up: sorted p 0.01, 0.02, 0.03, 0.5 over m = 4 give 0.04, 0.04, 0.04, 0.5 (each p * m / rank,
    # then the running minimum from the largest down); a test not made (NaN) is not in the family
    q = fdr_adjusted([0.03, math.nan, 0.5, 0.01, 0.02])
    assert q[:1] + q[2:] == pytest.approx([0.04, 0.5, 0.04, 0.04]) and math.isnan(q[1])
    assert fdr_adjusted([0.04]) == pytest.approx([0.04]) and fdr_adjusted([]) == []
    assert math.isnan(fdr_adjusted([math.nan])[0])


def test_comparison_view_gives_each_pairs_difference_and_welch_p(tmp_path: Path) -> None:
    records = [record("lora", s, 0.50 + 0.01 * s, 0.5, 1e-3) for s in range(3)]
    records += [record("taso", s, 0.60 + 0.01 * s, 0.6, 1e-3) for s in range(3)]
    records += [record("bitfit", s, 0.52 + 0.02 * s, 0.5, 1e-3) for s in range(2)]
    write_runs(tmp_path / "study", records)
    runs = load_store(refresh_store("study", [tmp_path / "study"], tmp_path / "results"))
    table = comparison_table(runs, [("taso@r1", "lora@r1"), ("bitfit", "lora@r1")])
    p = ttest_ind([60, 61, 62], [50, 51, 52], equal_var=False).pvalue
    mde = detectable_difference([60, 61, 62], [50, 51, 52])
    # one test made in the table: its q is its p
    assert table.loc["taso@r1 - lora@r1", "RTE (Acc)"] == f"+10.0 (p = {p:#.2g}, q = {p:#.2g}, MDE {mde:.1f}) {HIGHER}"
    assert table.loc["bitfit - lora@r1", "RTE (Acc)"] == "+2.0 (p = nan, q = nan, MDE nan)"  # two seeds: not tested
    with pytest.raises(ValueError, match="no final runs of tsqlora@r1"):
        comparison_table(runs, [("tsqlora@r1", "lora@r1")])


# --- published tables ------------------------------------------------------------------------

def test_environment_view_counts_runs_per_set_of_versions(tmp_path: Path) -> None:
    """Runs on two transformers releases and one without versions recorded: three rows, most
    runs first, each naming its table rows; the block option prints it as Markdown."""
    versions = lambda transformers: {"python": "3.11.7", "machine": "x86_64", "cpu_count": 2, "torch_threads": 1,  # noqa: E731
                                     "versions": {"torch": "2.13.0", "transformers": transformers, "peft": "0.21.2"}}
    records = [{**record("lora", s, 0.5, 0.5, 1e-3), "meta": versions("5.24.0")} for s in range(3)]
    records += [{**record("taso", 0, 0.6, 0.6, 1e-3), "meta": versions("5.25.0")}, record("taso", 1, 0.6, 0.6, 1e-3)]
    write_runs(tmp_path / "study", records)
    refresh_store("study", [tmp_path / "study"], tmp_path / "results")
    table = environment_table(load_store(store_path("study", tmp_path / "results")))
    assert list(table["runs"]) == [3, 1, 1] and list(table["rows"]) == ["lora@r1", "taso@r1", "taso@r1"]
    assert list(table["transformers"]) == ["5.24.0", "5.25.0", "not recorded"] and set(table["datasets"]) == {"not recorded"}
    assert list(table.loc[0, ["cores", "threads"]]) == ["2", "1"]
    block = regenerate("<!-- study-table: study show=environment -->\n<!-- /study-table -->", tmp_path / "results")
    assert "| 5.25.0 " in block and "meta.git_commit" in block


def test_published_tables_are_up_to_date_with_their_stores() -> None:
    assert stale_docs() == []


def test_notebook_brings_back_the_deleted_published_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    published = published_docs(ROOT / "docs")
    assert ROOT / "README.md" in published and len(published) > 1, "the README and docs/ publish study tables"
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    for path in published:
        (stripped / path.name).write_text(strip_tables(path.read_text(encoding="utf-8")), encoding="utf-8")
    monkeypatch.setenv("TASO_DOCS", str(stripped))
    monkeypatch.setenv("TASO_DOCS_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("TASO_RUNS", str(tmp_path / "no_runs"))
    notebook = nbformat.read(ROOT / "analysis" / "results.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    for path in published:
        assert (tmp_path / "out" / path.name).read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), path.name


@pytest.mark.parametrize(
    ("options", "refusal"),
    [("colour=red", "unknown options"), ("final", r"key=value, not \['final'\]"),
     ("compare=taso@r1", r"pairs .* not \['taso@r1'\]"), ("compare=taso@r1:lora@r1,:lora@r8", r"not \[':lora@r8'\]"),
     ("show=weather", r"show=weather \(valid: scores, environment\)"), ("seeds=0-", "seeds takes seeds and ranges"),
     ("seeds=2-0", r"not '2-0'")],
)
def test_regenerate_refuses_malformed_block_options_naming_them(tmp_path: Path, options: str, refusal: str) -> None:
    with pytest.raises(ValueError, match=refusal):
        regenerate(f"<!-- study-table: smoke_rte {options} -->\n<!-- /study-table -->", tmp_path)


# --- cost estimate ---------------------------------------------------------------------------

def test_estimate_counts_the_sweeps_runs_and_steps(glue_dir: Path, tmp_path: Path) -> None:
    table = estimate(["experiment=smoke_rte", f"data.dir={glue_dir}", f"paths.runs={tmp_path}"], {("lora@r1", "rte"): 2.0, ("bitfit", "mrpc"): 9.0}, default_step=1.0)
    assert list(table["cell"]) == ["lora@r1", "taso@r1"] and list(table["runs"]) == [3, 3] and list(table["done"]) == [0, 0]
    assert list(table["steps/run"]) == [4, 4]  # 24 training rows (below the cap of 80): 2 batches of 16, 2 epochs
    assert list(table["hours"]) == pytest.approx([3 * 4 * 2.0 / 3600, 3 * 4 * 2.0 / 3600])
    assert list(table["step measured on"]) == ["rte", "other methods"]
    # measured on other tasks only: their median, said so; nothing measured and no default: refused
    other = estimate(["experiment=smoke_rte", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", "method=lora"], {("lora@r1", "mrpc"): 1.0, ("lora@r1", "stsb"): 3.0}, None)
    assert list(other["step (s)"]) == [2.0] and list(other["step measured on"]) == ["other tasks"]
    with pytest.raises(ValueError, match=r"no measured step time for taso@r1 \(measured: lora@r1\)"):
        estimate(["experiment=smoke_rte", f"data.dir={glue_dir}", f"paths.runs={tmp_path}"], {("lora@r1", "mrpc"): 1.0}, None)
    # the task measured on other rows: the row's other tasks scaled by the task's ratio on those rows,
    # else the task's other rows
    times = {("lora@r1", "mrpc"): 1.0, ("taso@r1", "mrpc"): 2.0, ("taso@r1", "rte"): 3.0}
    scaled = estimate(["experiment=smoke_rte", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", "method=lora"], times, None)
    assert list(scaled["step (s)"]) == [1.5] and list(scaled["step measured on"]) == ["other tasks, scaled"]
    task_only = estimate(["experiment=smoke_rte", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", "method=lora"], {("taso@r1", "rte"): 3.0, ("bitfit", "rte"): 5.0}, None)
    assert list(task_only["step (s)"]) == [4.0] and list(task_only["step measured on"]) == ["other methods"]
    # a method that does not use the budget: named alone, its step time the same at any budget
    bitfit = estimate(["experiment=smoke_rte", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", "method=bitfit", "budget=r8"], {("bitfit", "rte"): 5.0}, None)
    assert list(bitfit["cell"]) == ["bitfit"] and list(bitfit["step (s)"]) == [5.0] and list(bitfit["step measured on"]) == ["rte"]
    select = estimate(["experiment=smoke_rte_select", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", "method=lora"], {}, default_step=1.0)
    assert list(select["runs"]) == [2] and list(select["steps/run"]) == [4]  # 2 factors; 24 - 5 held out = 19 rows
    # an evaluation-only method costs no step, and needs no measured step time
    zero = estimate(["experiment=smoke_rte", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", "method=zero_shot,lora"], {("lora@r1", "rte"): 2.0}, None)
    assert list(zero["cell"]) == ["zero_shot", "lora@r1"] and list(zero["steps/run"]) == [0, 4]
    assert list(zero["hours"]) == pytest.approx([0.0, 3 * 4 * 2.0 / 3600]) and zero["step measured on"][0] == "trains nothing"


def test_estimate_leaves_out_the_runs_a_rerun_skips(glue_dir: Path, tmp_path: Path) -> None:
    """A finished run (completed or diverged) of the same identity config is done and costs nothing;
    a failed run, or a finished one of another config (here: another epoch count), still costs."""
    overrides = ["experiment=smoke_rte", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", "method=lora"]
    for folder, extra, status in [("seed0-a", [], "completed"), ("seed1-b", ["seed=1"], "diverged"), ("seed2-c", ["seed=2"], "failed"),
                                  ("seed2-d", ["seed=2", "trainer.epochs=3"], "completed")]:
        run_dir = tmp_path / "rte" / "minilm" / "lora-r1" / folder
        write_config(run_dir, compose([*overrides, *extra]))
        write_results(run_dir, {"status": status})
    table = estimate(overrides, {("lora@r1", "rte"): 2.0}, None)
    assert list(table["runs"]) == [3] and list(table["done"]) == [2]
    assert list(table["hours"]) == pytest.approx([1 * 4 * 2.0 / 3600])


def test_estimate_counts_the_run_a_best_factor_at_the_grids_edge_owes(glue_dir: Path, tmp_path: Path) -> None:
    """1x beat 4x on the slice: with selection.extend_edges the cell owes a 0.25x run, counted
    (and costed) until it has run; without, nothing past the grid."""
    overrides = ["experiment=smoke_rte_select", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", "method=lora"]

    def finished(factor: float, score: float) -> None:
        run_dir = tmp_path / "rte" / "minilm" / "lora-r1" / f"seed0-{factor:g}"
        write_config(run_dir, compose([*overrides, f"selection.lr_factor={factor:g}"]))
        write_results(run_dir, {"status": "completed", "metrics": {"main": score},
                                "selection": {"stage": "select", "rule": "holdout", "lr_factor": factor}})

    finished(1, 0.6)
    finished(4, 0.5)
    owed = estimate([*overrides, "selection.extend_edges=true"], {("lora@r1", "rte"): 1.0}, None)
    assert (list(owed["runs"]), list(owed["past edge"]), list(owed["done"])) == ([3], [1], [2])
    assert list(owed["hours"]) == pytest.approx([1 * 4 * 1.0 / 3600])
    assert list(estimate(overrides, {("lora@r1", "rte"): 1.0}, None)["past edge"]) == [0]
    finished(0.25, 0.55)  # the edge run done: 1x lies inside the factors tried, nothing more owed
    bracketed = estimate([*overrides, "selection.extend_edges=true"], {("lora@r1", "rte"): 1.0}, None)
    assert (list(bracketed["runs"]), list(bracketed["hours"])) == ([2], [0.0])


def test_step_times_come_from_stores_and_runs_folders(tmp_path: Path) -> None:
    def record(method: str, step: float, status: str = "completed", budget: str = "r1") -> dict:
        return {"method": method, "budget": budget, "task": "rte", "status": status, "step_time_s": step}

    store = tmp_path / "study.jsonl"
    store.write_text("\n".join(json.dumps(record("lora", s)) for s in (1.0, 3.0, 2.0)) + "\n" + json.dumps(record("lora", 99.0, "failed")) + "\n")
    run = tmp_path / "runs" / "taso"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(record("taso", 5.0)))
    for budget, step in (("r1", 4.0), ("r8", 6.0), ("r8", 8.0)):
        (tmp_path / "runs" / f"full-{budget}-{step}").mkdir()
        (tmp_path / "runs" / f"full-{budget}-{step}" / "results.json").write_text(json.dumps(record("full", step, budget=budget)))
    # medians over completed runs only, both sources merged; a method that does not use the
    # budget is one row whatever budget its runs carry
    assert measured_step_times([store, tmp_path / "runs"]) == {("lora@r1", "rte"): 2.0, ("taso@r1", "rte"): 5.0, ("full", "rte"): 6.0}
    with pytest.raises(ValueError, match="no runs there"):
        measured_step_times([tmp_path / "runs" / "empty"])
