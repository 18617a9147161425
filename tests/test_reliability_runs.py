"""Run folders under concurrent and repeated use: locks, identity from config and data,
permissions, names, sweep exit status (issue cases 4-8)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import experiments.runner as runner_module
from analysis.collect import load_runs
from analysis.tables import results_tables
from conftest import OFFLINE_ENV, REPO, run_py
from experiments.config import ConfigError
from experiments.runner import run
from experiments.storage import LOCK, RunLocked, exclusive_lock, run_identity

TINY = ("model=tiny", "trainer=fast", "logger=none")


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def stamp(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


# --- one process per run folder ----------------------------------------------------------------


def test_a_second_process_on_a_locked_run_folder_fails_naming_the_holder(make_cfg, tmp_path: Path) -> None:
    folder = tmp_path / "busy"
    with exclusive_lock(folder / LOCK):
        with pytest.raises(RunLocked, match=rf"{folder} is in use by process .*:{os.getpid()}.*wait_for_lock=true"):
            run(make_cfg("method=lora"), folder)
    assert not (folder / "results.json").exists() and not (folder / "config.yaml").exists()


def test_cli_on_a_locked_run_folder_exits_nonzero_naming_the_pid(cli, glue_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "run"
    with exclusive_lock(folder / LOCK):
        out = cli(*TINY, "method=lora", f"data.dir={glue_dir}", f"hydra.run.dir={folder}", cwd=tmp_path)
    assert out.returncode != 0 and f"is in use by process" in out.stderr and f":{os.getpid()}" in out.stderr
    assert not (folder / "results.json").exists()


def test_wait_for_lock_waits_then_skips_the_run_the_holder_finished(make_cfg, tmp_path: Path) -> None:
    """Two overlapping sweeps: the second waits for the shared run and does not train it again."""
    folder = tmp_path / "shared"
    results = run(make_cfg("method=lora"), folder)
    finished = stamp(results)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with exclusive_lock(folder / LOCK):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    threading.Timer(1.0, release.set).start()
    start = time.monotonic()
    assert run(make_cfg("method=lora", "wait_for_lock=true"), folder) == results
    holder.join()
    assert time.monotonic() - start >= 0.9 and stamp(results) == finished


# --- identity: config and data --------------------------------------------------------------


def test_rerun_with_other_data_runs_again_and_the_same_data_elsewhere_is_skipped(
    make_cfg, glue_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "run"
    results = run(make_cfg("method=lora"), folder)
    first = read(results)
    assert set(first["fingerprints"]["data"]) == {"rte/train", "rte/validation"} and first["run_id"]
    copy = tmp_path / "copy"
    shutil.copytree(glue_dir, copy)
    finished = stamp(results)
    assert run(make_cfg("method=lora", f"data.dir={copy}"), folder) == results and stamp(results) == finished
    with pytest.raises(ValueError, match="data.dir .*missing is not a folder"):
        run(make_cfg("method=lora", f"data.dir={tmp_path / 'missing'}"), folder)
    assert stamp(results) == finished
    train = copy / "RTE" / "train.tsv"
    train.write_text(train.read_text().replace("guitar", "violin"))  # a corrected data file
    second = read(run(make_cfg("method=lora", f"data.dir={copy}"), folder))
    assert second["fingerprints"]["data"]["rte/train"] != first["fingerprints"]["data"]["rte/train"]
    assert second["fingerprints"]["data"]["rte/validation"] == first["fingerprints"]["data"]["rte/validation"]
    assert second["run_id"] != first["run_id"] and second["meta"]["pid"] == os.getpid()


def test_rerun_with_other_weights_runs_again(make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "run"
    results = run(make_cfg("method=lora"), folder)
    finished = stamp(results)
    monkeypatch.setattr(runner_module, "weights_fingerprint", lambda cfg: "sha256:rebuilt")
    assert read(run(make_cfg("method=lora"), folder))["fingerprints"]["weights"] == "sha256:rebuilt"
    assert stamp(results) != finished


def test_a_finished_run_whose_config_changed_under_the_same_folder_runs_again(make_cfg, tmp_path: Path) -> None:
    """A preset the command line does not name (a protocol's epochs) changes the run but not
    its folder, which the overrides name: the old results must not be kept as the new run's."""
    folder = tmp_path / "run"
    first = read(run(make_cfg("method=lora", "trainer.max_steps=2"), folder))
    second = read(run(make_cfg("method=lora", "trainer.max_steps=3"), folder))
    assert second["run_id"] != first["run_id"] and (first["steps"], second["steps"]) == (2, 3)
    finished = stamp(folder / "results.json")
    assert run(make_cfg("method=lora", "trainer.max_steps=3"), folder) == folder / "results.json"
    assert stamp(folder / "results.json") == finished  # the same config again: skipped


def test_a_protocol_entry_for_another_task_leaves_the_run_identity_alone(make_cfg) -> None:
    """Giving one task its own epochs (protocol.per_task) must not re-run every other task."""
    cfg = make_cfg("method=lora")
    before = run_identity(cfg, {})
    OmegaConf.update(cfg, "protocol.per_task", {"mrpc": {"epochs": 10}}, force_add=True)
    assert run_identity(cfg, {}) == before
    OmegaConf.update(cfg, "protocol.per_task", {cfg.task.name: {"epochs": 10}}, force_add=True)
    assert run_identity(cfg, {}) != before


def test_results_without_fingerprints_are_run_again(make_cfg, tmp_path: Path) -> None:
    """Results written before fingerprints were recorded cannot be vouched for."""
    results = run(make_cfg("method=lora"), tmp_path / "run")
    record = read(results)
    del record["fingerprints"]
    results.write_text(json.dumps(record))
    assert "fingerprints" in read(run(make_cfg("method=lora"), tmp_path / "run"))


def test_a_renamed_copy_of_a_run_folder_is_refused_not_an_extra_row(make_cfg, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    original = runs / "rte" / "tiny" / "lora-r1" / "seed0-default"
    run(make_cfg("method=lora"), original)
    assert list(results_tables(load_runs(runs))["tiny"].text.index) == ["lora@r1"]
    for copy in (original.with_name("seed0-default.bak"), runs / "old" / "run1"):
        shutil.copytree(original, copy)
        with pytest.raises(ValueError, match="more than once") as info:
            results_tables(load_runs(runs))
        assert str(copy) in str(info.value)
        shutil.rmtree(copy)


def test_runs_of_other_options_have_other_identities(make_cfg, tmp_path: Path) -> None:
    a = read(run(make_cfg("method=lora", "trainer.max_steps=2"), tmp_path / "a"))
    b = read(run(make_cfg("method=lora", "trainer.max_steps=3"), tmp_path / "b"))
    c = read(run(make_cfg("method=lora", "trainer.max_steps=2", "trainer.progress_bar=false"), tmp_path / "c"))
    assert a["run_id"] != b["run_id"] and a["run_id"] == c["run_id"]  # progress bars change no result


# --- files and names ----------------------------------------------------------------------------


def test_run_files_honour_the_umask(make_cfg, tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        folder = tmp_path / "shared"
        run(make_cfg("method=lora", "trainer.save_model=true"), folder)
    finally:
        os.umask(old)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {"results.json", "config.yaml", "model.safetensors"} <= {p.name for p in files}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o664" for p in files}


@pytest.mark.parametrize("override", ["model.name=../../x", "task.name=a/b", "method.name=..", "budget.name="])
def test_names_that_would_leave_paths_runs_are_refused(make_cfg, override: str) -> None:
    with pytest.raises(ConfigError, match="cannot name a run folder"):
        make_cfg("method=lora", override)


def test_cli_refuses_a_name_that_would_leave_paths_runs(cli, glue_dir: Path, tmp_path: Path) -> None:
    runs = tmp_path / "a" / "b" / "runs"
    runs.mkdir(parents=True)
    out = cli(*TINY, "method=lora", "model.name=../../x", f"data.dir={glue_dir}", f"paths.runs={runs}", cwd=tmp_path)
    assert out.returncode != 0 and "cannot name a run folder" in out.stderr
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_dir() and "glue" not in p.parts) == ["a", "b", "runs"]


def test_train_loss_is_recorded_when_max_steps_is_below_logging_steps(make_cfg, tmp_path: Path) -> None:
    results = read(run(make_cfg("method=lora", "trainer.max_steps=2", "trainer.logging_steps=10"), tmp_path / "short"))
    assert results["steps"] == 2 and results["train_loss_history"] == []
    assert isinstance(results["train_loss"], float) and results["train_loss"] > 0


# --- sweeps ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_with_a_locked_run_exits_nonzero(cli, glue_dir: Path, tmp_path: Path) -> None:
    with exclusive_lock(tmp_path / "seed1" / LOCK):
        out = cli(
            "-m", *TINY, "method=lora", "seed=0,1", "hydra.sweep.subdir=seed${seed}", f"data.dir={glue_dir}", f"paths.runs={tmp_path}",
            cwd=tmp_path,
        )
    assert out.returncode != 0 and "sweep: 2 runs: 1 completed, 1 locked" in out.stderr


WANDB_PROBE = """
import atexit, socket, sys
lookups = []
def refuse(host, *args, **kwargs):
    lookups.append(host)
    raise OSError("no network")
socket.getaddrinfo = refuse
atexit.register(lambda: print("dns lookups:", lookups))  # runs after wandb's own exit handlers
from experiments.config import compose
from experiments.tracking import tracking
cfg = compose(["logger=wandb", "logger.mode=offline"])
with tracking(cfg, sys.argv[1], "probe"):
    import wandb
    wandb.log({"loss": 1.0})  # as the Trainer's W&B callback does
"""


def test_wandb_offline_makes_no_dns_lookup(tmp_path: Path) -> None:
    env = {k: v for k, v in OFFLINE_ENV.items() if not k.startswith("WANDB_")}
    out = subprocess.run(
        [sys.executable, "-c", WANDB_PROBE, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dns lookups: []" in out.stdout, out.stdout
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_an_interrupted_run_is_not_resumed_on_other_data(make_cfg, glue_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    steps = ("method=lora", "trainer.max_steps=4", "trainer.save_strategy=steps", "trainer.save_steps=2", "trainer.keep_checkpoints=true")
    run(make_cfg(*steps), folder)
    (folder / "results.json").unlink()  # as if killed after its last checkpoint
    assert read(run(make_cfg(*steps), folder))["resumed_from"]  # same data: resumed
    (folder / "results.json").unlink()
    train = glue_dir / "RTE" / "train.tsv"
    train.write_text(train.read_text().replace("guitar", "violin"))
    assert read(run(make_cfg(*steps), folder))["resumed_from"] is None  # corrected data: from the start


# --- run folder names ----------------------------------------------------------------------------
def run_folder(*overrides: str) -> str:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from experiments.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return str(cfg.hydra.run.dir)


def test_result_neutral_overrides_leave_the_folder_name_and_study_folders_keep_theirs() -> None:
    """One list (experiments.storage.RESULT_NEUTRAL) feeds the run_id and the folder suffix: an
    override under any of its keys names no new folder; a change that renamed stored study
    runs' folders (a re-run would not find them) fails on the pinned names."""
    neutral = ("logger=none", "logger.mode=offline", "paths.runs=/tmp/x", "data.dir=/tmp/d", "data.cache_dir=/tmp/c",
               "wait_for_lock=true", "trainer.progress_bar=false", "trainer.keep_checkpoints=true", "trainer.save_model=true",
               "trainer.num_threads=1", "trainer.save_strategy=no", "trainer.save_steps=5")
    assert run_folder("method=lora", *neutral) == "/tmp/x/rte/minilm/lora-r1/seed0-default"
    assert not run_folder("method=lora", "trainer.lr=1e-3").endswith("-default")  # a rate changes results
    assert run_folder("experiment=glue_minilm_cpu_select", "task=stsb", "method=lora", "selection.lr_factor=4", "seed=0",
                      "trainer.progress_bar=false") == "runs/glue_minilm_cpu_select/stsb/minilm/lora-r1/seed0-70bc78d0"
    assert run_folder("experiment=smoke_rte", "method=taso", "seed=2") == "runs/smoke_rte/rte/minilm/taso-r1/seed2-3a11ed7c"
