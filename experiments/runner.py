"""One run, end to end: data, model, method, training, evaluation, storage.

Callable without Hydra (the tests compose a config and call :func:`run`); ``run.py`` is a
thin Hydra entry point over it. :func:`run` keeps the run folder's bookkeeping (skip a
finished run, record a failed or diverged one); :func:`run_stages` is the run itself, named
stages in order (:func:`load_data`, :func:`adapt`, :func:`train`, the data's ``evaluate``,
:func:`record`), callable with an injected model. Under ``torchrun`` / ``accelerate launch``
every process runs them (the Trainer does data-parallel training); only the main process
(``RANK`` 0) writes into the run folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, set_seed

from experiments import causal
from experiments.adaptation import MethodLayer
from experiments.budget import count_params, lora_param_count
from experiments.config import check_config
from experiments.console import RUN_LOG, data_line, library_output_to, model_line, trainable_line
from experiments.data import data_collator, data_source, task_rows, tokenize_counted
from experiments.methods import Method, PrepareContext, build_method, load_method_state
from experiments.metrics import constant_baseline, metric_values
from experiments.models import SAVED_MODEL, head_type, load_model_with_info, load_tokenizer, max_positions, weights_fingerprint
from experiments.selection import Stage, best_epoch_metrics, learning_rate, selection_record, stage_data
from experiments.storage import (
    LOCK,
    RESULTS,
    data_fingerprint,
    exclusive_lock,
    finished_results,
    honour_umask,
    meta_info,
    read_provenance,
    read_results,
    run_identity,
    stale_provenance,
    write_config,
    write_provenance,
    write_results,
)
from experiments.tracking import tracking
from experiments.precision import autocast
from experiments.training import (
    Diverged,
    StepTimer,
    TrainClock,
    build_trainer,
    eval_history,
    final_train_loss,
    last_complete_checkpoint,
    loss_history,
    peak_memory_mb,
    planned_optimizer_steps,
    run_precision,
    sequence_lengths,
    training_device,
)


CHECKPOINTS = "checkpoints"  # the Trainer's checkpoints inside a run folder


def is_main_process() -> bool:
    """True except in the non-zero ranks of a ``torchrun`` / ``accelerate launch`` job."""
    return int(os.environ.get("RANK", "0")) == 0


def batch_source(
    dataset: Any, tokenizer: Any, batch_size: int, seed: int, collator: Optional[Callable] = None
) -> Callable[..., Iterable[dict]]:
    """Fresh, seeded iterators over padded training batches (for methods that look at data
    before training, e.g. TASO's importance estimation); ``collator`` defaults to padding
    sequence-classification rows.

    ``batches()`` follows one seeded permutation of the training set. ``batches(sorted_prefix=n)``
    gives the same examples in its first ``n`` batches, sorted by length among themselves, then
    the rest of the permutation: a pass that reads only ``n`` batches sees the same sample and
    pads far less (RTE: a random batch is about 60% padding, docs/speed.md)."""
    collate = collator or DataCollatorWithPadding(tokenizer)

    def batches(sorted_prefix: int = 0) -> Iterable[dict]:
        generator = torch.Generator().manual_seed(seed)
        if not sorted_prefix:
            return iter(DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate))
        # the plain order, drawn as the plain loader draws it
        chunks = [c.tolist() for c in DataLoader(range(len(dataset)), batch_size=batch_size, shuffle=True, generator=generator)]
        head = sorted((i for c in chunks[:sorted_prefix] for i in c), key=sequence_lengths(dataset).__getitem__)
        chunks[:sorted_prefix] = [head[i : i + batch_size] for i in range(0, len(head), batch_size)]
        return iter(DataLoader(dataset, batch_sampler=chunks, collate_fn=collate))

    return batches


def prepare_context(cfg: Any, model: torch.nn.Module, train_ds: Any, tokenizer: Any) -> PrepareContext:
    """What a method sees while adapting ``model``: targets, budget, training batches, device,
    and the number of optimizer steps the Trainer will take on ``train_ds`` (none: a method
    that trains nothing)."""
    collate = data_collator(head_type(cfg), tokenizer)
    return PrepareContext(
        target_modules=list(cfg.model.target_modules),
        head_modules=list(cfg.model.head_modules),
        budget_rank=cfg.budget.rank,
        budget_params=lora_param_count(model, list(cfg.model.target_modules), cfg.budget.rank),
        train_batches=batch_source(train_ds, tokenizer, cfg.trainer.batch_size, cfg.seed, collate),
        head_type=head_type(cfg),
        seed=cfg.seed,
        device=training_device(cfg),
        total_steps=planned_optimizer_steps(cfg, len(train_ds)) if train_ds is not None else 0,
        collate=collate,
    )


def prepare_method(cfg: Any, method: Any, model: torch.nn.Module, ctx: PrepareContext) -> torch.nn.Module:
    """``method.prepare`` with its passes over data (TASO's importance, LoSiA's first subnet,
    TsqLoRA's scoring) under the run's autocast, as its training steps will run: TASO's core
    regions from a bf16 pass match the fp32 ones (analysis.importance_overlap: 99.7% of rows
    and 99.8% of columns on RTE, 32 batches)."""
    with autocast(run_precision(cfg), ctx.device):
        return method.prepare(model, ctx)


def save_model(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    """The fine-tuned model (safetensors) and its tokenizer, loadable with ``from_pretrained``.
    Refuses a model that still holds a method's own layers (its ``merged_model`` does not fold
    them in), whose weights ``from_pretrained`` would not find."""
    custom = sorted({type(m).__name__ for m in model.modules() if isinstance(m, MethodLayer)})
    if custom:
        raise ValueError(f"trainer.save_model: the method leaves its own layers {custom} in the model; it cannot be saved as a plain model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def encoder_splits(cfg: Any, tokenizer: Any, trains: bool) -> tuple[dict[str, Any], dict[str, int]]:
    """A task head's splits, tokenized before training (too long inputs fail here): training
    (when the method trains), evaluation and ``task.extra_eval_splits``; and the examples cut
    per ``<task>/<split>`` (only with ``task.allow_truncation``)."""
    task = cfg.task
    splits = [*([task.train_split] if trains else []), task.eval_split, *task.extra_eval_splits]
    raws = {split: task_rows(task, split, cfg.data.dir, cfg.data.cache_dir, cfg.seed) for split in splits}
    if trains:  # a selection run trains and is scored on two parts of the training set
        raws[task.train_split], raws[task.eval_split] = stage_data(cfg, raws[task.train_split], raws[task.eval_split])
    tokenized, truncated = {}, {}
    for split, raw in raws.items():
        tokenized[split], truncated[f"{task.name}/{split}"] = tokenize_counted(raw, task, tokenizer, split)
    return tokenized, truncated


def encoder_evaluation(
    cfg: Any, trainer: Any, history: list[dict[str, float]], eval_ds: Any, extra_ds: dict[str, Any]
) -> tuple[dict[str, float], int, dict[str, int]]:
    """Final metrics of a task head: the evaluation split's, then each of
    ``task.extra_eval_splits`` (``extra_ds``) with its suffix (``accuracy_mm``); the
    evaluation split's row count, and the rows per ``<task>/<split>``."""
    task = cfg.task
    # the Trainer already evaluated at the last step when the schedule ended on an eval
    final = history[-1] if history and history[-1]["step"] == trainer.state.global_step else trainer.evaluate()
    metrics = metric_values(final, "eval")
    samples = {f"{task.name}/{task.eval_split}": len(eval_ds)}
    for split, suffix in task.extra_eval_splits.items():
        values = metric_values(trainer.evaluate(eval_dataset=extra_ds[split], metric_key_prefix=suffix), suffix)
        metrics.update({f"{k}_{suffix}": v for k, v in values.items()})
        samples[f"{task.name}/{split}"] = len(extra_ds[split])
    return metrics, len(eval_ds), samples


def say(line: str) -> None:
    """A line of the run's console summary (main process only)."""
    if is_main_process():
        print(line, flush=True)


def identity(cfg: Any) -> dict[str, Any]:
    return {
        "task": cfg.task.name,
        "method": cfg.method.name,
        "budget": cfg.budget.name,
        "budget_rank": cfg.budget.rank,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "protocol": cfg.protocol.name,
    }


def provenance(cfg: DictConfig) -> dict[str, Any]:
    """The run's identity (config and data), the fingerprints of its data and weights, and for a
    final run the rate its selection runs chose (``lr``: not part of the identity, which names
    the selection folder, not what is in it)."""
    data = data_fingerprint(causal.member_tasks(cfg.task), cfg.data.dir, train=build_method(cfg.method).trains)
    recorded = {"run_id": run_identity(cfg, data), "fingerprints": {"data": data, "weights": weights_fingerprint(cfg.model)}}
    if cfg.selection.from_runs is not None:
        recorded["lr"] = learning_rate(cfg).lr
    return recorded


def run(cfg: DictConfig, run_dir: Path) -> Path:
    """Train and evaluate one configuration; return the path of its results.json.

    The config is checked first (:func:`experiments.config.check_config`), before anything
    loads. The main process then holds the run folder's lock for the whole run: a second
    process on the same folder fails with :class:`RunLocked` naming the holder, or waits for
    it with ``wait_for_lock=true``. A run that raises still writes results.json, with status
    ``failed`` and the error, then re-raises. A run whose loss turns NaN / inf stops there and
    records status ``diverged`` with the step (not an error: it is a result of that
    configuration). A run whose results.json already says ``completed`` or ``diverged`` is not
    run again while the identity (config and data) and the weights fingerprint it recorded
    still match; a ``failed`` or interrupted one is (resuming from its last complete checkpoint).
    """
    check_config(cfg)
    run_dir = Path(run_dir)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    lock = exclusive_lock(run_dir / LOCK, wait=cfg.wait_for_lock) if is_main_process() else contextlib.nullcontext()
    with lock:
        recorded = provenance(cfg)
        done = finished_results(run_dir)
        if done is not None:
            stale = stale_provenance(read_results(done), recorded)
            if not stale:
                print(f"already finished, skipped: {done}", file=sys.stderr)
                return done
            print(f"{done} was computed from other {' and '.join(stale)}: running it again", file=sys.stderr)
        if is_main_process():
            if (run_dir / CHECKPOINTS).exists() and read_provenance(run_dir) != recorded:
                print(f"{run_dir / CHECKPOINTS} started from another config, data or weights: not resumed", file=sys.stderr)
                shutil.rmtree(run_dir / CHECKPOINTS)
            write_config(run_dir, cfg)
            write_provenance(run_dir, recorded)
        try:
            with library_output_to(run_dir / RUN_LOG if is_main_process() else None):
                return run_stages(cfg, run_dir, recorded=recorded)
        except Diverged as diverged:
            print(f"diverged: {diverged}", file=sys.stderr)
            return record_outcome(cfg, run_dir, recorded, status="diverged", diverged_at_step=diverged.step, error=str(diverged))
        except Exception as error:
            record_outcome(
                cfg, run_dir, recorded, status="failed", error_type=type(error).__name__, error=str(error),
                traceback=traceback.format_exc(),
            )
            raise
        finally:
            if is_main_process():
                honour_umask(run_dir)


def record_outcome(cfg: DictConfig, run_dir: Path, recorded: dict[str, Any], **outcome: Any) -> Path:
    """results.json for a run that ended without results (failed, diverged); main process only."""
    if not is_main_process():
        return run_dir / RESULTS
    return write_results(run_dir, {**identity(cfg), **recorded, **outcome, "meta": meta_info()})


# --- the run's stages, in order: load, adapt, train, evaluate, record -------------------------


@dataclass
class EncoderData:
    """A task head's data: the training set (None: the method trains nothing) and the
    evaluation split; the metrics come from the Trainer's evaluation."""

    train: Any
    eval: Any
    extra: dict[str, Any]  # task.extra_eval_splits, tokenized
    truncated: dict[str, int]  # examples cut per <task>/<split>

    def evaluate(self, cfg: Any, trainer: Any, model: torch.nn.Module, tokenizer: Any, history: list[dict]) -> tuple[dict, int, dict]:
        return encoder_evaluation(cfg, trainer, history, self.eval, self.extra)


@dataclass
class CausalData:
    """A causal LM's data: the training set of the member tasks in their prompt format, and
    their evaluation sets, scored by choice log-likelihood after training (no evaluation set
    during training)."""

    train: Any
    eval_sets: list
    truncated: dict[str, int]  # examples cut per <task>/<split>
    eval: None = None

    def evaluate(self, cfg: Any, trainer: Any, model: torch.nn.Module, tokenizer: Any, history: list[dict]) -> tuple[dict, int, dict]:
        return causal.evaluate(model, tokenizer, self.eval_sets, cfg.trainer.eval_batch_size)


@dataclass
class Adapted:
    """The model as the method prepared it, what the method saw, its training set and the counts."""

    model: torch.nn.Module
    ctx: PrepareContext
    train: Any
    counts: dict[str, int]


@dataclass
class Trained:
    trainer: Any
    timer: StepTimer
    time_s: float
    resumed_from: Optional[str]
    history: list[dict[str, float]]


def load_task_model(cfg: Any) -> torch.nn.Module:
    """The pretrained backbone with the run's head (one console line)."""
    task = cfg.task
    if task.mix and head_type(cfg) != "causal_lm":
        raise ValueError(f"task {task.name} mixes tasks {list(task.mix)}: only a causal LM (model.kind=causal_lm) trains on a mixture")
    model, location, new_keys = load_model_with_info(cfg.model, num_labels=len(task.label_names) or 1, task_type=head_type(cfg))
    say(model_line(cfg.model.name, model, location, new_keys, list(cfg.model.head_modules)))
    return model


def check_length(cfg: Any, model: torch.nn.Module) -> None:
    limit = max_positions(model)
    if limit and cfg.task.max_length > limit:
        raise ValueError(f"task.max_length={cfg.task.max_length} exceeds model {cfg.model.name}'s limit of {limit} positions")


def load_data(cfg: Any, tokenizer: Any, trains: bool = True) -> EncoderData | CausalData:
    """The run's data, by the model's head, every split read and tokenized before training (too
    long inputs fail here, with their count); ``trains=False`` (a method that trains nothing,
    method=zero_shot) reads no training split. One console line."""
    task = cfg.task
    data: EncoderData | CausalData
    if head_type(cfg) == "causal_lm":
        if Stage(cfg.selection.stage) is Stage.select:
            raise ValueError("selection.stage=select carves its validation slice for a task head; a causal LM has none")
        members = causal.member_tasks(task)
        train_ds, truncated = causal.training_set(members, cfg.data.dir, cfg.data.cache_dir, tokenizer, cfg.seed) if trains else (None, {})
        eval_sets = causal.evaluation_sets(members, cfg.data.dir, cfg.data.cache_dir, tokenizer, cfg.seed)
        truncated.update({f"{s.task.name}/{s.split}": s.truncated for s in eval_sets})
        data = CausalData(train_ds, eval_sets, truncated)
        sizes = {f"{s.task.name}/{s.split}": len(s.requests) for s in eval_sets}
    else:
        tokenized, truncated = encoder_splits(cfg, tokenizer, trains)
        data = EncoderData(tokenized.pop(task.train_split, None), tokenized.pop(task.eval_split), tokenized, truncated)
        sizes = {task.eval_split: len(data.eval), **{split: len(ds) for split, ds in data.extra.items()}}
    sizes = {task.train_split: len(data.train) if data.train is not None else 0, **sizes}
    say(data_line(task.name, data_source(task, cfg.data.dir), sizes, sum(data.truncated.values())))
    return data


def adapt(cfg: Any, method: Method, model: torch.nn.Module, data: EncoderData | CausalData, tokenizer: Any) -> Adapted:
    """The method prepares the model and chooses its training examples (one console line)."""
    ctx = prepare_context(cfg, model, data.train, tokenizer)
    model = prepare_method(cfg, method, model, ctx)
    train_ds = method.select_train_data(data.train, ctx)
    counts = count_params(model, list(cfg.model.head_modules))
    say(trainable_line(cfg.method.name, cfg.budget.name, counts, method.trains))
    return Adapted(model, ctx, train_ds, counts)


def train(cfg: Any, method: Method, adapted: Adapted, eval_ds: Any, tokenizer: Any, run_dir: Path) -> Trained:
    """The Trainer on the adapted model, resumed from the run's last complete checkpoint: the
    method's state first (:func:`experiments.methods.load_method_state`), then the Trainer's
    (weights, optimizer, scheduler, RNG, step)."""
    timer = StepTimer()
    checkpoints = run_dir / CHECKPOINTS
    resume = last_complete_checkpoint(checkpoints)
    clock = TrainClock(resume)
    trainer = build_trainer(cfg, method, adapted.model, adapted.train, eval_ds, tokenizer, checkpoints, timer, clock)
    if method.trains:
        if resume is not None:
            load_method_state(method, Path(resume), training_device(cfg))
        trainer.train(resume_from_checkpoint=resume)
    return Trained(trainer, timer, clock.seconds, resume, eval_history(trainer))


def record(
    cfg: Any, run_dir: Path, method: Method, adapted: Adapted, trained: Trained, evaluation: tuple[dict, int, dict], tokenizer: Any,
    recorded: Optional[dict[str, Any]] = None, truncated: Optional[dict[str, int]] = None,
) -> Path:
    """results.json (with ``recorded``: the run's identity and fingerprints; ``truncated``: the
    examples cut per split), the method's artifacts and (``trainer.save_model``) the merged
    model; main process only."""
    if not is_main_process():
        return run_dir / RESULTS
    metrics, n_eval, samples = evaluation
    rate = learning_rate(cfg)  # a final run's factor is read from its selection runs' folders
    model, trainer = adapted.model, trained.trainer
    method.save_artifacts(model, str(run_dir))
    results = {
        **identity(cfg),
        **(recorded or {}),
        "status": "completed",
        "metric": cfg.task.metric,
        "metrics": metrics,
        "metrics_best": best_epoch_metrics(trained.history, metrics),
        "lr": rate.lr,
        "selection": selection_record(cfg, rate),
        "eval_history": trained.history,
        "train_loss": final_train_loss(trainer),
        "train_loss_history": loss_history(trainer),
        "budget_params": adapted.ctx.budget_params,
        **adapted.counts,
        "train_time_s": trained.time_s,
        "step_time_s": trained.timer.median,
        "steps": trainer.state.global_step,
        "precision": run_precision(cfg).value,
        "peak_memory_mb": peak_memory_mb(),
        "resumed_from": trained.resumed_from,
        "train_samples": len(adapted.train) if adapted.train is not None else 0,
        "eval_samples": n_eval,
        "eval_samples_by_split": samples,
        "truncated": truncated or {},
        **method.extra_results(model),
        "meta": meta_info(),
    }
    if cfg.trainer.save_model:
        save_model(method.merged_model(model), tokenizer, run_dir / SAVED_MODEL)
    path = write_results(run_dir, results)
    if not cfg.trainer.keep_checkpoints:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    return path


def run_stages(
    cfg: Any, run_dir: Path, model: Optional[torch.nn.Module] = None, method: Optional[Method] = None,
    recorded: Optional[dict[str, Any]] = None,
) -> Path:
    """The run's stages (load data, adapt, train, evaluate, record) without :func:`run`'s
    lock / skip / resume / failure bookkeeping; ``model`` and ``method`` replace the ones the
    config names (tests inject a model they can inspect); ``recorded`` goes into results.json."""
    set_seed(cfg.seed)
    method = method if method is not None else build_method(cfg.method)
    tokenizer = load_tokenizer(cfg.model)
    model = model if model is not None else load_task_model(cfg)
    check_length(cfg, model)
    data = load_data(cfg, tokenizer, method.trains)
    adapted = adapt(cfg, method, model, data, tokenizer)
    run_name = f"{cfg.task.name}/{cfg.method.name}@{cfg.budget.name}/{cfg.model.name}/seed{cfg.seed}"
    with tracking(cfg, run_dir, run_name):
        trained = train(cfg, method, adapted, data.eval, tokenizer, Path(run_dir))
        evaluation = data.evaluate(cfg, trained.trainer, adapted.model, tokenizer, trained.history)
    recorded = {**(recorded or {}), **constant_record(cfg, data.eval)}
    return record(cfg, Path(run_dir), method, adapted, trained, evaluation, tokenizer, recorded, data.truncated)


def constant_record(cfg: Any, eval_ds: Any) -> dict[str, Any]:
    """``metrics_constant``: the best constant predictor on a task head's evaluation labels
    (what the run must beat); nothing for a causal LM's choice scoring."""
    if eval_ds is None or "labels" not in eval_ds.column_names:
        return {}
    return {"metrics_constant": constant_baseline(cfg.task.metric, np.asarray(eval_ds["labels"]))}
