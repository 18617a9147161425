"""The training loop: the transformers ``Trainer`` with the method's optimizer groups and hooks.

The harness adds to it: a callback that times every optimizer step (the median is what
results.json and the benchmark report), one that keeps the run's training time in each
checkpoint so a resumed run's time is the whole run's, a check that stops a run whose loss is NaN or
infinite (:class:`Diverged`; the Trainer's own log filter would hide it), and the choice of
the last *complete* checkpoint to resume from (a run killed while saving leaves a partial one),
with the method's own state (:meth:`experiments.methods.Method.state_dict`) in each checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from peft import PeftModel
from torch.utils.data import Sampler
from transformers import (
    EvalPrediction,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from experiments.data import data_collator
from experiments.models import head_type
from experiments.methods import METHOD_STATE, Method, MethodHooks
from experiments.metrics import compute_metrics
from experiments.precision import Precision, resolve_precision
from experiments.selection import learning_rate

CHECKPOINT_PREFIX = "checkpoint-"
# a checkpoint is complete with both: the Trainer writes trainer_state.json after the weights and
# optimizer, then MethodHooks writes the method's state
CHECKPOINT_COMPLETE = ("trainer_state.json", METHOD_STATE)
CLOCK = "train_clock.json"  # in every checkpoint: the run's training time up to it (TrainClock)


class Diverged(RuntimeError):
    """The training loss became NaN or infinite at ``step`` (the 1-based optimizer step)."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"training loss is {loss} at step {step}")
        self.step = step
        self.loss = loss


def sequence_lengths(dataset: Any) -> list[int]:
    """The tokens every row takes before padding: its token count; for a multiple-choice row (a
    token list per choice, padded to its longest) the choices times the longest."""
    return [len(ids) * max(map(len, ids)) if ids and isinstance(ids[0], list) else len(ids) for ids in dataset["input_ids"]]


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length grouping (a random permutation cut into mega-batches of up to 50
    batches, each sorted by length, the longest batch first), with the permutation drawn from
    ``seed + epoch`` alone. (The Trainer's own sampler draws it from the global RNG, which the
    model's initialisation and dropout also consume: the order would depend on the method.)"""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it before each epoch, resumed ones too
        self.epoch = epoch

    def __iter__(self):  # noqa: ANN204
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class LengthSortedSampler(Sampler):
    """Longest row first: each evaluation batch pads to about its own rows' length. The metrics
    are those of any order (predictions and labels are permuted together)."""

    def __init__(self, lengths: list[int]) -> None:
        self.order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):  # noqa: ANN204
        return iter(self.order)


class HarnessTrainer(Trainer):
    """The Trainer, stopping at the first non-finite training loss (``trainer.stop_on_nonfinite``),
    with length-grouped training batches (``trainer.group_by_length``), length-sorted
    evaluation (``trainer.sort_eval_by_length``) and checkpoints that keep only
    ``checkpoint_keys`` of the model's state (:func:`checkpoint_keys`).

    The check reads one scalar per micro-batch; the Trainer's ``logging_nan_inf_filter`` would
    otherwise replace a NaN loss in the logs and let the run go on with NaN weights.
    """

    def __init__(
        self,
        *args: Any,
        stop_on_nonfinite: bool = True,
        group_by_length: bool = False,
        sort_eval_by_length: bool = False,
        checkpoint_keys: Optional[frozenset[str]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stop_on_nonfinite = stop_on_nonfinite
        self.group_by_length = group_by_length
        self.sort_eval_by_length = sort_eval_by_length
        self.checkpoint_keys = checkpoint_keys

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """A checkpoint's weights: only the ``checkpoint_keys`` entries of the model's state
        (:func:`checkpoint_keys`)."""
        if state_dict is None and self.checkpoint_keys is not None:
            state_dict = {k: v for k, v in self.model.state_dict().items() if k in self.checkpoint_keys}
        super()._save(output_dir, state_dict)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """Resuming: the entries a checkpoint leaves out are the frozen pretrained weights the
        model was rebuilt with; one of ``checkpoint_keys`` missing is a checkpoint that does
        not hold the run's trained weights, which must not resume."""
        if self.checkpoint_keys is not None:
            lost = sorted(set(load_result.missing_keys) & self.checkpoint_keys)
            if lost:
                names = ", ".join(lost[:3]) + (", ..." if len(lost) > 3 else "")
                raise RuntimeError(f"the checkpoint lacks {len(lost)} of the run's trained weights ({names}): it cannot resume this run")
            load_result = load_result._replace(missing_keys=[])
        super()._issue_warnings_after_load(load_result)

    def _get_train_sampler(self, train_dataset: Any = None) -> Optional[Sampler]:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return SeededLengthGroupedSampler(batch, sequence_lengths(dataset), self.args.data_seed)

    def _get_eval_sampler(self, eval_dataset: Any) -> Optional[Sampler]:
        if not self.sort_eval_by_length or self.args.world_size > 1:
            return super()._get_eval_sampler(eval_dataset)
        return LengthSortedSampler(sequence_lengths(eval_dataset))

    def compute_loss(self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False, **kwargs: Any):  # noqa: ANN201
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss = result[0] if return_outputs else result
        if self.stop_on_nonfinite and model.training and not torch.isfinite(loss.detach()).all():
            raise Diverged(self.state.global_step + 1, float(loss.detach().float().mean()))
        return result


def checkpoint_keys(model: torch.nn.Module, method: Method) -> Optional[frozenset[str]]:
    """The state entries a checkpoint keeps: the parameters that train and the buffers (a
    method's index sets and masks); ``None``, the Trainer's own choice, for a method that
    writes into weights it does not train (:attr:`Method.writes_frozen_weights`: the whole
    model) and for a peft model (its adapter alone). A resumed run rebuilds the rest from the
    pretrained weights, which the run's provenance pins."""
    if method.writes_frozen_weights or isinstance(model, PeftModel):
        return None
    return frozenset({n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()})


def last_complete_checkpoint(folder: Path) -> Optional[str]:
    """The highest-step ``checkpoint-N`` under ``folder`` that was written to the end
    (:data:`CHECKPOINT_COMPLETE`). One without the method's state (killed before it was
    written, or saved by a version of the harness that did not write it) is incomplete: a
    resumed run would lose the method's schedule state, so it resumes from an older checkpoint,
    or starts over."""
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(p.name.removeprefix(CHECKPOINT_PREFIX)), p)
        for p in folder.iterdir()
        if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()
    )
    for _, path in reversed(steps):
        if all((path / name).is_file() for name in CHECKPOINT_COMPLETE):
            return str(path)
    return None


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (forward, backward, optimizer, method hooks): it starts
    at the first ``on_step_begin`` callback and stops at the last ``on_step_end`` one, by
    ``timer.stop`` (``build_trainer`` puts the timer first and its stop last, around the
    method's hooks, :class:`experiments.methods.MethodHooks`)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0
        self.stop = _StepTimerStop(self)

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self._sync()
        self._start = time.perf_counter()

    def record(self) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._start)

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None


class _StepTimerStop(TrainerCallback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.timer.record()


class TrainClock(TrainerCallback):
    """Training wall time summed over the processes that ran one run: every checkpoint keeps the
    time up to it (:data:`CLOCK`), and a run resumed from a checkpoint counts on from there.
    Work lost to a kill (after the last checkpoint) is not counted; it is redone and counted once."""

    def __init__(self, resume: Optional[str]) -> None:
        clock = Path(resume) / CLOCK if resume else None
        self.before = float(json.loads(clock.read_text())["train_time_s"]) if clock and clock.is_file() else 0.0
        self._start: Optional[float] = None

    @property
    def seconds(self) -> float:
        return self.before + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self._start = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            (checkpoint / CLOCK).write_text(json.dumps({"train_time_s": self.seconds}))


def peak_memory_mb() -> float:
    """Peak accelerator memory when training on a GPU, else the process's peak resident size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_device(cfg: Any) -> torch.device:
    if torch.cuda.is_available() and not cfg.trainer.use_cpu:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def run_precision(cfg: Any) -> Precision:
    """``trainer.precision`` resolved on the training device (``auto`` -> bf16 or fp32)."""
    return resolve_precision(cfg.trainer.precision, training_device(cfg))


def training_arguments(cfg: Any, output_dir: Path, lr: float, evaluate: bool = True) -> TrainingArguments:
    """The Trainer's arguments; ``evaluate=False`` (no evaluation set: the causal-LM mode scores
    choices after training) turns its evaluations off. Mixed precision on a CPU needs the
    Trainer's ``use_cpu`` (its bf16 check otherwise asks for a GPU)."""
    t = cfg.trainer
    precision = run_precision(cfg)
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
        eval_strategy=t.eval_strategy if evaluate else "no",
        eval_steps=t.eval_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps if t.save_steps is not None else 500,
        save_total_limit=2,  # the newest may be half-written when the run is killed
        bf16=precision is Precision.bf16,
        fp16=precision is Precision.fp16,
        use_cpu=t.use_cpu or (precision is not Precision.fp32 and training_device(cfg).type == "cpu"),
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not t.progress_bar,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=["wandb"] if cfg.logger.name == "wandb" else [],
        remove_unused_columns=False,
        # the Trainer would multiply each process's loss by the world size, a rescaling meant
        # for losses summed over tokens and divided by the global count; every loss here is a
        # per-process mean, which DDP's gradient averaging already combines correctly
        average_tokens_across_devices=False,
    )


def planned_optimizer_steps(cfg: Any, n_train_examples: int) -> int:
    """The number of optimizer steps ``Trainer.train`` will take, known before it starts (the
    Trainer's own rule): ``trainer.max_steps`` when > 0, else
    ``ceil(epochs * max(ceil(ceil(n / (batch_size * world_size)) / accumulation), 1))`` (the
    last, partial batch and the last, short accumulation window each make a step; under
    torchrun each of ``WORLD_SIZE`` processes takes its own batch of every step)."""
    t = cfg.trainer
    if t.max_steps > 0:
        return int(t.max_steps)
    if n_train_examples <= 0:
        raise ValueError("planned_optimizer_steps: the training set is empty")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    batches_per_epoch = math.ceil(n_train_examples / (t.batch_size * world_size))
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
    clock: Optional[TrainClock] = None,
) -> Trainer:
    lr = learning_rate(cfg).lr
    args = training_arguments(cfg, output_dir, lr, evaluate=eval_ds is not None)
    # a method that trains nothing has no parameter groups to optimize
    optimizer = torch.optim.AdamW(method.param_groups(model, lr, cfg.trainer.weight_decay), lr=lr) if method.trains else None
    metric = cfg.task.metric

    def metrics_fn(pred: EvalPrediction) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return compute_metrics(metric, np.asarray(logits), np.asarray(pred.label_ids))

    return HarnessTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=data_collator(head_type(cfg), tokenizer),
        compute_metrics=metrics_fn,
        optimizers=(optimizer, None),
        callbacks=[timer, MethodHooks(method), timer.stop, *([clock] if clock else [])],
        stop_on_nonfinite=cfg.trainer.stop_on_nonfinite,
        group_by_length=cfg.trainer.group_by_length,
        sort_eval_by_length=cfg.trainer.sort_eval_by_length,
        checkpoint_keys=checkpoint_keys(model, method),
    )


def eval_history(trainer: Trainer) -> list[dict[str, float]]:
    """Every evaluation of the run: step, epoch and the ``eval_*`` metrics."""
    return [
        {k: v for k, v in entry.items() if k.startswith("eval_") or k in ("step", "epoch")}
        for entry in trainer.state.log_history
        if "eval_main" in entry
    ]


def loss_history(trainer: Trainer) -> list[dict[str, float]]:
    """The logged training loss, every ``trainer.logging_steps`` steps."""
    return [{"step": e["step"], "loss": float(e["loss"])} for e in trainer.state.log_history if "loss" in e]


def final_train_loss(trainer: Trainer) -> Optional[float]:
    """The last logged training loss; when the run ended before its first logging step
    (``max_steps < logging_steps``), the Trainer's mean loss over the run."""
    losses = loss_history(trainer)
    if losses:
        last = losses[-1]["loss"]
    else:
        means = [e["train_loss"] for e in trainer.state.log_history if "train_loss" in e]
        if not means:
            return None
        last = float(means[-1])
    return last if math.isfinite(last) else float("nan")
