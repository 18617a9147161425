"""What a run prints, and where the libraries' own output goes.

The console gets one line each for the model load (what was loaded, what was newly
initialised and whether that is expected), the data (source and split sizes) and the
trainable count, then the training progress bar and the results path. transformers' load
report, its weight-loading bar and the libraries' warnings go to ``<run folder>/run.log``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import datasets
import transformers

from experiments.budget import matches

RUN_LOG = "run.log"
# the loggers whose records go to run.log instead of the console while a run is on
LIBRARY_LOGGERS = ("transformers", "datasets", "peft", "huggingface_hub", "accelerate", "py.warnings")


@contextlib.contextmanager
def library_output_to(log_path: Optional[Path]) -> Iterator[None]:
    """Send the libraries' log records and Python warnings to ``log_path`` (nowhere when
    None: the non-main ranks of a multi-process run), and hide transformers' weight-loading
    bar and datasets' map bars, until the block ends; the previous handlers and settings are restored."""
    handler: logging.Handler = logging.NullHandler()
    if log_path is not None:
        handler = logging.FileHandler(log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in loggers]
    bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    map_bars_were_on = datasets.is_progress_bar_enabled()
    for logger in loggers:
        logger.handlers = [handler]
        logger.propagate = False
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()  # the tokenizing passes (seconds)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each warning once per place, into run.log
            yield
    finally:
        logging.captureWarnings(False)
        if bars_were_on:
            transformers.utils.logging.enable_progress_bar()
        if map_bars_were_on:
            datasets.enable_progress_bars()
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        handler.close()


def _names(keys: list[str], shown: int = 4) -> str:
    listed = ", ".join(keys[:shown])
    return listed + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def model_line(name: str, model: Any, location: str, new_keys: Optional[list[str]], head_modules: list[str]) -> str:
    """One line: the model loaded, and its newly initialised tensors, each judged expected
    (inside ``head_modules``: the task head, new for every task) or not (None: a random model)."""
    size = sum(p.numel() for p in model.parameters())
    line = f"model: {name} ({type(model).__name__}, {size / 1e6:.1f}M parameters) from {location}"
    if new_keys is None:
        return line + "; every weight randomly initialised (a test model)"
    if not new_keys:
        return line + "; every weight from the checkpoint"
    parts = [key.split(".") for key in new_keys]
    in_head = [k for k, p in zip(new_keys, parts) if any(matches(".".join(p[:i]), head_modules) for i in range(1, len(p)))]
    others = [k for k in new_keys if k not in in_head]
    if in_head:
        line += f"; new: {_names(sorted(in_head))} (the task head, not in a pretrained checkpoint: expected, it is trained)"
    if others:
        line += f"; UNEXPECTEDLY new (randomly initialised, see {RUN_LOG}): {_names(sorted(others))}"
    return line


def data_line(task: str, source: str, sizes: dict[str, int], truncated: int = 0) -> str:
    """One line: where the data came from, each split's row count, and the examples cut to
    ``task.max_length`` (only with ``task.allow_truncation``)."""
    listed = ", ".join(f"{split} {n}" for split, n in sizes.items())
    cut = f"; {truncated} examples cut to task.max_length (task.allow_truncation)" if truncated else ""
    return f"data: {task} from {source}: {listed}{cut}"


def trainable_line(method: str, budget: str, counts: dict[str, int], trains: bool) -> str:
    """One line: what the method trains (or that it trains nothing)."""
    if not trains:
        return f"trainable: none ({method} evaluates the model as loaded)"
    backbone = counts["total_params"] - counts["head_params"]
    share = 100 * counts["trainable_params"] / backbone if backbone else 0.0
    return (
        f"trainable: {counts['trainable_params']:,} backbone parameters ({share:.3f}% of {backbone:,}) "
        f"+ {counts['head_params']:,} in the head; method {method}, budget {budget}"
    )
