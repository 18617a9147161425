"""Entry point: ``python run.py method=taso task=rte budget=r1`` (one run) or
``python run.py -m method=taso,lora task=rte,mrpc seed=0,1,2`` (a sweep).

Composes the config with Hydra, runs it through :func:`experiments.runner.run`, and prints
the path of the run's results.json as its last line. In a sweep, a run that fails is
recorded (results.json with status ``failed``) and the sweep goes on; a single run that
fails exits non-zero.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from experiments.config import register_configs
from experiments.data import DataError
from experiments.runner import run

register_configs()

if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
    # one W&B group for every run of this sweep, inherited by launcher processes
    os.environ.setdefault("WANDB_RUN_GROUP", "sweep-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def limit_threads_for_parallel_jobs(cfg: DictConfig, launcher: DictConfig) -> None:
    """Under the joblib launcher, give each job cores / n_jobs torch threads (unless
    ``trainer.num_threads`` is set), so parallel runs do not oversubscribe the cores."""
    if cfg.trainer.num_threads is None and "joblib" in str(launcher.get("_target_", "")):
        n_jobs = int(launcher.get("n_jobs") or 1)
        cores = os.cpu_count() or 1
        torch.set_num_threads(1 if n_jobs < 1 else max(1, cores // n_jobs))


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> Optional[str]:
    hydra_cfg = HydraConfig.get()
    limit_threads_for_parallel_jobs(cfg, hydra_cfg.launcher)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        path = run(cfg, run_dir)
    except Exception as error:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            if isinstance(error, DataError):  # missing data: the message says what to do
                sys.exit(f"error: {error}")
            raise
        print(f"run failed, the sweep goes on: {type(error).__name__}: {error} (see {run_dir / 'results.json'})", file=sys.stderr)
        return None
    print(path)
    return str(path)


if __name__ == "__main__":
    main()
