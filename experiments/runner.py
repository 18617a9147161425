"""One run, end to end: data, model, method, training, evaluation, storage.

Callable without Hydra (the tests compose a config and call :func:`run`); ``run.py`` is a
thin Hydra entry point over it.
"""

from __future__ import annotations

import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, set_seed
from transformers.trainer_utils import get_last_checkpoint

from experiments.budget import count_params, lora_param_count
from experiments.data import load_split, subsample, tokenize
from experiments.methods import PrepareContext, build_method
from experiments.models import load_model, load_tokenizer, max_positions
from experiments.storage import completed_results, meta_info, write_config, write_results
from experiments.tracking import tracking
from experiments.training import StepTimer, build_trainer, eval_history, final_train_loss, peak_memory_mb


def batch_source(dataset: Any, tokenizer: Any, batch_size: int, seed: int) -> Callable[[], Iterable[dict]]:
    """Fresh, seeded iterators over padded training batches (for methods that look at data
    before training, e.g. TASO's importance estimation)."""

    def batches() -> Iterable[dict]:
        generator = torch.Generator().manual_seed(seed)
        return iter(
            DataLoader(
                dataset,
                batch_size=batch_size,
                shuffle=True,
                generator=generator,
                collate_fn=DataCollatorWithPadding(tokenizer),
            )
        )

    return batches


def prepare_context(cfg: Any, model: torch.nn.Module, train_ds: Any, tokenizer: Any) -> PrepareContext:
    """What a method sees while adapting ``model``: targets, budget, training batches, device."""
    return PrepareContext(
        target_modules=list(cfg.model.target_modules),
        head_modules=list(cfg.model.head_modules),
        budget_rank=cfg.budget.rank,
        budget_params=lora_param_count(model, list(cfg.model.target_modules), cfg.budget.rank),
        train_batches=batch_source(train_ds, tokenizer, cfg.trainer.batch_size, cfg.seed),
        task_type="seq_cls",
        seed=cfg.seed,
        device=torch.device("cuda" if torch.cuda.is_available() and not cfg.trainer.use_cpu else "cpu"),
    )


def identity(cfg: Any) -> dict[str, Any]:
    return {
        "task": cfg.task.name,
        "method": cfg.method.name,
        "budget": cfg.budget.name,
        "budget_rank": cfg.budget.rank,
        "model": cfg.model.name,
        "seed": cfg.seed,
    }


def run(cfg: DictConfig, run_dir: Path) -> Path:
    """Train and evaluate one configuration; return the path of its results.json.

    A run that raises still writes results.json, with status ``failed`` and the error. A run
    whose results.json already says ``completed`` is not run again.
    """
    run_dir = Path(run_dir)
    done = completed_results(run_dir)
    if done is not None:
        print(f"already completed, skipped: {done}", file=sys.stderr)
        return done
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    try:
        return _run(cfg, run_dir)
    except Exception as error:
        write_results(
            run_dir,
            {
                **identity(cfg),
                "status": "failed",
                "error_type": type(error).__name__,
                "error": str(error),
                "traceback": traceback.format_exc(),
                "meta": meta_info(),
            },
        )
        raise


def _run(cfg: DictConfig, run_dir: Path) -> Path:
    set_seed(cfg.seed)
    method = build_method(cfg.method)
    task = cfg.task
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, num_labels=len(task.label_names) or 1)
    limit = max_positions(model)
    if limit and task.max_length > limit:
        raise ValueError(f"task.max_length={task.max_length} exceeds model {cfg.model.name}'s limit of {limit} positions")

    train_raw = subsample(load_split(task, task.train_split, cfg.data.dir, cfg.data.cache_dir), task.max_train_samples, cfg.seed)
    eval_raw = subsample(load_split(task, task.eval_split, cfg.data.dir, cfg.data.cache_dir), task.max_eval_samples, cfg.seed)
    train_ds, eval_ds = tokenize(train_raw, task, tokenizer), tokenize(eval_raw, task, tokenizer)

    ctx = prepare_context(cfg, model, train_ds, tokenizer)
    model = method.prepare(model, ctx)
    train_ds = method.select_train_data(train_ds, ctx)
    counts = count_params(model, list(cfg.model.head_modules))

    timer = StepTimer()
    checkpoints = run_dir / "checkpoints"
    run_name = f"{task.name}/{cfg.method.name}@{cfg.budget.name}/{cfg.model.name}/seed{cfg.seed}"
    with tracking(cfg, run_dir, run_name):
        trainer = build_trainer(cfg, method, model, train_ds, eval_ds, tokenizer, checkpoints, timer)
        resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        train_time = time.perf_counter() - start
        history = eval_history(trainer)
        # the Trainer already evaluated at the last step when the schedule ended on an eval
        final = history[-1] if history and history[-1]["step"] == trainer.state.global_step else trainer.evaluate()

    metrics = {
        k.removeprefix("eval_"): v for k, v in final.items() if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))
    }
    method.save_artifacts(model, str(run_dir))
    results = {
        **identity(cfg),
        "status": "completed",
        "metric": task.metric,
        "metrics": metrics,
        "eval_history": history,
        "train_loss": final_train_loss(trainer),
        "budget_params": ctx.budget_params,
        **counts,
        "train_time_s": train_time,
        "step_time_s": timer.median,
        "steps": trainer.state.global_step,
        "peak_memory_mb": peak_memory_mb(),
        "resumed_from": resume,
        "train_samples": len(train_ds),
        "eval_samples": len(eval_ds),
        **method.extra_results(model),
        "meta": meta_info(),
    }
    path = write_results(run_dir, results)
    if not cfg.trainer.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return path
