"""The training loop: the transformers ``Trainer`` with the method's optimizer groups and hooks.

The harness adds two callbacks of its own: one times every optimizer step (the median is
what results.json and the benchmark report), one makes sure the method's per-step hooks see
the step after the optimizer has run.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from transformers import (
    DataCollatorWithPadding,
    EvalPrediction,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from experiments.methods import Method
from experiments.metrics import compute_metrics


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer, method hooks)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self._sync()
        self.times.append(time.perf_counter() - self._start)

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None


def peak_memory_mb() -> float:
    """Peak accelerator memory when training on a GPU, else the process's peak resident size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_arguments(cfg: Any, output_dir: Path, lr: float) -> TrainingArguments:
    t = cfg.trainer
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=lr,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        weight_decay=t.weight_decay,
        warmup_steps=float(t.warmup_ratio),  # a float in [0, 1) is a ratio of all steps
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_strategy=t.eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=t.save_strategy,
        save_total_limit=1,
        bf16=t.bf16,
        fp16=t.fp16,
        use_cpu=t.use_cpu,
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not t.progress_bar,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=["wandb"] if cfg.logger.name == "wandb" else [],
        remove_unused_columns=False,
    )


def planned_optimizer_steps(cfg: Any, n_train_examples: int) -> int:
    """The number of optimizer steps ``Trainer.train`` will take, known before it starts (the
    Trainer's own rule, single process): ``trainer.max_steps`` when > 0, else
    ``ceil(epochs * max(ceil(ceil(n / batch_size) / accumulation), 1))`` (the last, partial batch
    and the last, short accumulation window each make a step)."""
    t = cfg.trainer
    if t.max_steps > 0:
        return int(t.max_steps)
    if n_train_examples <= 0:
        raise ValueError("planned_optimizer_steps: the training set is empty")
    batches_per_epoch = math.ceil(n_train_examples / t.batch_size)
    steps_per_epoch = max(math.ceil(batches_per_epoch / t.gradient_accumulation_steps), 1)
    return math.ceil(t.epochs * steps_per_epoch)


def build_trainer(
    cfg: Any,
    method: Method,
    model: torch.nn.Module,
    train_ds: Any,
    eval_ds: Any,
    tokenizer: Any,
    output_dir: Path,
    timer: StepTimer,
) -> Trainer:
    lr = cfg.trainer.lr if cfg.trainer.lr is not None else cfg.method.lr
    args = training_arguments(cfg, output_dir, lr)
    optimizer = torch.optim.AdamW(method.param_groups(model, lr, cfg.trainer.weight_decay), lr=lr)
    metric = cfg.task.metric

    def metrics_fn(pred: EvalPrediction) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return compute_metrics(metric, np.asarray(logits), np.asarray(pred.label_ids))

    return Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics_fn,
        optimizers=(optimizer, None),
        callbacks=[timer, *method.callbacks()],
    )


def eval_history(trainer: Trainer) -> list[dict[str, float]]:
    """Every evaluation of the run: step, epoch and the ``eval_*`` metrics."""
    return [
        {k: v for k, v in entry.items() if k.startswith("eval_") or k in ("step", "epoch")}
        for entry in trainer.state.log_history
        if "eval_main" in entry
    ]


def final_train_loss(trainer: Trainer) -> Optional[float]:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if not losses:
        return None
    return float(losses[-1]) if math.isfinite(losses[-1]) else float("nan")
