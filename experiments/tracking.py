"""Experiment tracking: Weights & Biases, offline by default (``wandb sync`` uploads later).

``logger=wandb`` starts one W&B run per harness run, in ``<run dir>/wandb``; the Trainer's
own W&B callback then logs losses and evaluations into it. Runs of one sweep share a group:
``run.py -m`` sets ``WANDB_RUN_GROUP`` once for the whole sweep (inherited by launcher
processes), and ``logger.group`` overrides it.

``logger.mode`` is also given to ``wandb.setup``: the SDK's process-wide settings decide
whether its analytics reach out to the W&B servers, so ``wandb.init(mode="offline")`` alone
still made a DNS lookup (of ``api.forge.coreweave.com``, at exit).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from omegaconf import OmegaConf


@contextlib.contextmanager
def tracking(cfg: Any, run_dir: Path, run_name: str) -> Iterator[None]:
    if cfg.logger.name == "none":
        yield
        return
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    wandb.setup(settings=wandb.Settings(mode=str(cfg.logger.mode)))
    run = wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        mode=str(cfg.logger.mode),
        group=cfg.logger.group or os.environ.get("WANDB_RUN_GROUP"),
        name=run_name,
        tags=list(cfg.logger.tags),
        dir=str(run_dir),
        config=OmegaConf.to_container(cfg, resolve=True),
        reinit="finish_previous",
    )
    try:
        yield
    finally:
        run.finish()
