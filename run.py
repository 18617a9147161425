"""Entry point: ``python run.py method=taso task=rte budget=r1`` (one run) or
``python run.py -m method=taso,lora task=rte,mrpc seed=0,1,2`` (a sweep).

Composes the config with Hydra, runs it through :func:`experiments.runner.run`, and prints
the path of the run's results.json as its last line.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.config import register_configs
from experiments.runner import run

register_configs()

if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
    # one W&B group for every run of this sweep, inherited by launcher processes
    os.environ.setdefault("WANDB_RUN_GROUP", "sweep-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> str:
    path = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    print(path)
    return str(path)


if __name__ == "__main__":
    main()
