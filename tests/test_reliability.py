"""Sweeps that survive: failures recorded, divergence stopped, kill and resume, determinism,
and the parallel / cluster / multi-process launchers (on model=tiny)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import experiments.runner as runner_module
from conftest import OFFLINE_ENV, run_py
from experiments.models import load_model
from experiments.runner import run
from experiments.sweeps import threads_per_job
from experiments.training import CHECKPOINT_COMPLETE, last_complete_checkpoint

TINY = ("model=tiny", "trainer=fast", "logger=none")


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def results_under(root: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(root)): read(p) for p in sorted(root.rglob("results.json"))}


@pytest.mark.slow
def test_sweep_goes_on_after_a_failed_run_and_exits_nonzero(cli, glue_dir: Path, tmp_path: Path) -> None:
    out = cli("-m", *TINY, "method=lora", "task.max_length=64,4096", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    summary = out.stderr.split("sweep: ")[-1]
    assert summary.startswith("2 runs: 1 completed, 1 failed") and "exceeds model tiny's limit" in summary
    assert not (tmp_path / ".sweeps").exists()
    statuses = sorted(r["status"] for r in results_under(tmp_path).values())
    assert statuses == ["completed", "failed"]
    failed = next(r for r in results_under(tmp_path).values() if r["status"] == "failed")
    assert failed["error_type"] == "ValueError" and "exceeds model tiny's limit" in failed["error"]
    assert "the sweep goes on" in out.stderr


def test_single_failed_run_exits_nonzero(cli, glue_dir: Path, tmp_path: Path) -> None:
    out = cli(*TINY, "method=lora", "task.max_length=4096", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", cwd=tmp_path)
    assert out.returncode != 0 and "exceeds model tiny's limit" in out.stderr


def test_nan_loss_stops_the_run_as_diverged(make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg("method=lora", "trainer.max_steps=6")
    model = load_model(cfg.model, 2)
    calls = {"n": 0}

    def poison_third_step(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output

    model.classifier.register_forward_hook(poison_third_step)
    monkeypatch.setattr(runner_module, "load_model_with_info", lambda *_a, **_k: (model, "a test model", []))
    results = read(run(cfg, tmp_path / "nan"))
    assert results["status"] == "diverged" and results["diverged_at_step"] == 3
    assert calls["n"] == 3  # stopped at once: no further step, no evaluation
    assert run(cfg, tmp_path / "nan") == tmp_path / "nan" / "results.json"  # finished: not run again
    assert calls["n"] == 3


def test_rerun_skips_a_completed_run(make_cfg, tmp_path: Path) -> None:
    path = run(make_cfg("method=lora"), tmp_path / "done")
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    assert run(make_cfg("method=lora"), tmp_path / "done") == path
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_a_failed_run_is_run_again(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        run(make_cfg("method=lora", "task.max_length=4096"), tmp_path / "retry")
    assert read(tmp_path / "retry" / "results.json")["status"] == "failed"
    assert read(run(make_cfg("method=lora"), tmp_path / "retry"))["status"] == "completed"


def test_resume_ignores_a_half_written_checkpoint(tmp_path: Path) -> None:
    # 12: killed before trainer_state.json; 16: before the method's state (tests/test_resume.py)
    for step, files in ((4, CHECKPOINT_COMPLETE), (8, CHECKPOINT_COMPLETE), (12, ()), (16, ("trainer_state.json",))):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_same_seed_gives_identical_results(make_cfg, tmp_path: Path) -> None:
    first = read(run(make_cfg("method=taso", "trainer.max_steps=6"), tmp_path / "a"))
    second = read(run(make_cfg("method=taso", "trainer.max_steps=6"), tmp_path / "b"))
    assert first["metrics"] == second["metrics"]
    assert first["train_loss_history"] == second["train_loss_history"] and len(first["train_loss_history"]) == 6


def wait_for(predicate, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def start_sweep(glue_dir: Path, tmp_path: Path, *overrides: str) -> tuple[list[str], subprocess.Popen]:
    """``run.py -m`` on model=tiny in the background (its command line, its process)."""
    args = run_py("-m", *TINY, *overrides, f"data.dir={glue_dir}", f"paths.runs={tmp_path}")
    return args, subprocess.Popen(args, cwd=tmp_path, env=OFFLINE_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_sigkill_mid_sweep_then_rerun_completes_it(glue_dir: Path, tmp_path: Path) -> None:
    args, sweep = start_sweep(
        glue_dir, tmp_path, "method=taso", "seed=0,1", "trainer.max_steps=40", "trainer.save_strategy=steps", "trainer.save_steps=1"
    )
    runs = tmp_path / "rte" / "tiny" / "taso-r1"

    def seed1_checkpointed() -> bool:
        return any(last_complete_checkpoint(d / "checkpoints") for d in runs.glob("seed1-*"))

    try:
        assert wait_for(seed1_checkpointed, 300), "seed 1 never checkpointed"
        os.kill(sweep.pid, signal.SIGKILL)
    finally:
        sweep.kill()
        sweep.wait()
    (seed1,) = runs.glob("seed1-*")
    seed0 = next(runs.glob("seed0-*")) / "results.json"
    assert read(seed0)["status"] == "completed" and not (seed1 / "results.json").exists()
    finished = (seed0.read_bytes(), seed0.stat().st_mtime_ns)

    rerun = subprocess.run(args, cwd=tmp_path, env=OFFLINE_ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (seed0.read_bytes(), seed0.stat().st_mtime_ns) == finished  # untouched
    resumed = read(seed1 / "results.json")
    assert resumed["status"] == "completed" and resumed["steps"] == 40
    assert resumed["resumed_from"] and Path(resumed["resumed_from"]).name.startswith("checkpoint-")
    assert not (seed1 / "checkpoints").exists()


def children(pid: int) -> set[int]:
    return {int(c) for task in Path(f"/proc/{pid}/task").glob("*") for c in (task / "children").read_text().split()}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_killing_a_parallel_sweep_leaves_no_workers(glue_dir: Path, tmp_path: Path) -> None:
    _, sweep = start_sweep(
        glue_dir, tmp_path, "method=lora", "seed=0,1", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", "trainer.max_steps=100000"
    )
    workers: set[int] = set()
    try:
        assert wait_for(lambda: len(list(tmp_path.glob("rte/tiny/lora-r1/seed*/config.yaml"))) == 2, 300), "runs never started"
        workers = children(sweep.pid)
        assert workers, "no joblib workers started"
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait()
        assert wait_for(lambda: not any(map(alive, workers)), 20), "workers outlived the sweep"
    finally:
        sweep.kill()
        for worker in filter(alive, workers):
            os.kill(worker, signal.SIGKILL)


def launched_sweep(cli, glue_dir: Path, tmp_path: Path, *overrides: str) -> list[dict]:  # noqa: ANN001
    """The results of a LoRA sweep on model=tiny through a Hydra launcher; every run completed."""
    out = cli("-m", *overrides, *TINY, "method=lora", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list(results_under(tmp_path).values())
    assert runs and all(r["status"] == "completed" for r in runs)
    return runs


@pytest.mark.parametrize(("cores", "n_jobs", "threads"), [(8, 3, 2), (2, 2, 1), (2, 4, 1), (16, 1, 16), (16, -1, 1)])
def test_parallel_jobs_share_the_cores(cores: int, n_jobs: int, threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert threads_per_job(n_jobs) == threads


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_with_thread_limits(cli, glue_dir: Path, tmp_path: Path) -> None:
    runs = launched_sweep(cli, glue_dir, tmp_path, "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", "seed=0,1")
    assert sorted(r["seed"] for r in runs) == [0, 1]
    assert {r["meta"]["torch_threads"] for r in runs} == {threads_per_job(2)}
    assert len({r["meta"]["pid"] for r in runs}) == 2  # two worker processes


@pytest.mark.slow
def test_submitit_local_launcher(cli, glue_dir: Path, tmp_path: Path) -> None:
    runs = launched_sweep(cli, glue_dir, tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "task=rte,mrpc")
    assert sorted(r["task"] for r in runs) == ["mrpc", "rte"]


@pytest.mark.slow
def test_slurm_launcher_config_composes(cli, tmp_path: Path) -> None:
    out = cli("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", "--package", "hydra.launcher", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SlurmLauncher" in out.stdout and "partition: gpu" in out.stdout and "gpus_per_node: 1" in out.stdout


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(cli, glue_dir: Path, tmp_path: Path) -> None:
    """torchrun, 2 CPU processes on gloo, batch 4 each == 1 process with batch 8 (dropout off)."""
    common = [
        *TINY, "method=lora", "trainer.max_steps=3", "trainer.use_cpu=true", "+model.architecture.hidden_dropout_prob=0.0",
        "+model.architecture.attention_probs_dropout_prob=0.0", f"data.dir={glue_dir}",
    ]
    single = cli(*common, "trainer.batch_size=8", f"paths.runs={tmp_path / 'one'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517")
    double = cli(*common, "trainer.batch_size=4", f"paths.runs={tmp_path / 'two'}", cwd=tmp_path, launcher=torchrun)
    assert double.returncode == 0, double.stderr[-3000:]
    (one,), (two,) = results_under(tmp_path / "one").values(), results_under(tmp_path / "two").values()
    assert two["meta"]["world_size"] == 2 and one["meta"]["world_size"] == 1
    losses_one = [e["loss"] for e in one["train_loss_history"]]
    losses_two = [e["loss"] for e in two["train_loss_history"]]
    assert len(losses_one) == len(losses_two) == 3
    assert losses_one == pytest.approx(losses_two, rel=1e-4, abs=1e-5)
    assert one["metrics"]["main"] == pytest.approx(two["metrics"]["main"], abs=1e-6)
