"""Entry point: ``python run.py method=taso task=rte budget=r1`` (one run) or
``python run.py -m method=taso,lora task=rte,mrpc seed=0,1,2`` (a sweep).

Composes the config with Hydra, runs it through :func:`experiments.runner.run`, prints the
path of the run's results.json as its last line and returns it (under ``hydra/sweeper=optuna``:
the run's score on the validation slice, :mod:`experiments.objective`). In a sweep, a run that
fails is recorded (results.json with status ``failed``) and the sweep goes on; the sweep ends with a
summary of the runs' statuses and exits non-zero if one failed or found its folder locked
(:mod:`experiments.sweeps`). A single run that fails exits non-zero. Under the joblib launcher
each worker process ends with the sweep's process, even one killed with ``kill -9``.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Union

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from experiments.config import ConfigError, register_configs
from experiments.data import DataError
from experiments.objective import check_optimisable, objective, optimises
from experiments.runner import is_main_process, run
from experiments.storage import RunLocked, read_results
from experiments.sweeps import record_status, threads_per_job

register_configs()

if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
    # one W&B group for every run of this sweep, inherited by launcher processes
    os.environ.setdefault("WANDB_RUN_GROUP", "sweep-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_parent() -> None:
    """Have Linux send this process SIGTERM when its parent (the sweep's process) exits, however
    it exits: a killed sweep leaves no joblib worker training on."""
    if sys.platform != "linux":
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent exited before the call
        os.kill(os.getpid(), signal.SIGTERM)


def is_joblib(launcher: DictConfig) -> bool:
    return "joblib" in str(launcher.get("_target_", ""))


def limit_threads_for_parallel_jobs(cfg: DictConfig, launcher: DictConfig) -> None:
    """Under the joblib launcher, give each job cores / n_jobs torch threads (unless
    ``trainer.num_threads`` is set), so parallel runs do not oversubscribe the cores."""
    if cfg.trainer.num_threads is None and is_joblib(launcher):
        torch.set_num_threads(threads_per_job(int(launcher.get("n_jobs") or 1)))


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> Optional[Union[str, float]]:
    hydra_cfg = HydraConfig.get()
    optimised = optimises(hydra_cfg.sweeper)
    if optimised:
        try:
            check_optimisable(cfg)
        except ConfigError as error:  # SystemExit passes Hydra's job error handling: the sweep stops here
            sys.exit(f"error: {error}")
    if is_joblib(hydra_cfg.launcher):
        end_with_parent()
    limit_threads_for_parallel_jobs(cfg, hydra_cfg.launcher)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    job_num = hydra_cfg.job.num if hydra_cfg.mode == RunMode.MULTIRUN else 0
    try:
        path = run(cfg, run_dir)
    except Exception as error:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            if isinstance(error, (DataError, ConfigError, RunLocked)):  # the message says what to do
                sys.exit(f"error: {error}")
            raise
        status = "locked" if isinstance(error, RunLocked) else "failed"
        record_status(job_num, run_dir, status, f"{type(error).__name__}: {error}")
        print(f"run {status}, the sweep goes on: {type(error).__name__}: {error} (see {run_dir / 'results.json'})", file=sys.stderr)
        return None
    if is_main_process():  # under torchrun only rank 0 writes results.json
        record_status(job_num, run_dir, read_results(path)["status"])
    print(path)
    return objective(path) if optimised else str(path)


if __name__ == "__main__":
    main()
