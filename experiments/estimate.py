"""What a study costs before it runs: runs x optimizer steps x measured step time.

    python -m experiments.estimate experiment=glue_minilm_cpu_select --step-times results/smoke_rte.jsonl
    python -m experiments.estimate experiment=glue_minilm_cpu method=lora budget=r8 --step-time 1.7

The sweep is the one ``python run.py -m <same overrides>`` would launch (the experiment's
``hydra.sweeper.params``, replaced key by key by sweeps on the command line). Steps per run
follow the Trainer's rule on the real training-set size (after ``task.max_train_samples``
and, in a holdout selection run, without the validation slice). Step times are the median
``step_time_s`` per row (``method@budget``, or ``full``, ``bitfit``, ... alone: the tables'
names) and task of the completed runs in a store or runs folder (``--step-times``,
repeatable); for a cell those runs did not measure, its other tasks' times scaled by
how the task's time compares on the rows measured on both, else the task's other rows, else
the row's other tasks (:func:`step_time`; the table says which it took), else ``--step-time``. A method that trains nothing (method=zero_shot) costs no step. Evaluation,
model loading and TASO's importance pass are not counted. Runs already finished in the sweep's
runs folder (``paths.runs``: a run with the same identity config, :func:`finished_identities`)
are counted in ``done`` and cost nothing, so a resumed study prints what it still owes; a
selection cell whose finished runs put the best factor at the grid's edge counts the run past
it that ``selection.extend_edges`` owes (``past edge``, :func:`experiments.selection.owed_factor`),
not those its later runs may owe.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from experiments.config import CONF_DIR, register_configs
from experiments.data import load_split
from experiments.methods import load_methods, row_name
from experiments.selection import Rule, Stage, cell_folder, factor_scores, owed_factor
from experiments.storage import CONFIG, RESULTS, finished_results, identity_config, read_results
from experiments.training import planned_optimizer_steps

# swept keys that change neither the number of steps nor the step time: counted, not composed
COUNTED_ONLY = ("seed", "selection.lr_factor")


def sweep(overrides: list[str]) -> dict[str, list[str]]:
    """Key -> values of every job of ``run.py -m <overrides>``, merged as Hydra's basic
    sweeper does: the experiment's ``hydra.sweeper.params``, then the command line, a later
    key replacing an earlier one."""
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=fixed, return_hydra_config=True)
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.params or {}).items()]
    swept: dict[str, list[str]] = {}
    for override in parser.parse_overrides(params + list(overrides)):
        key = override.get_key_element()
        if override.is_sweep_override():
            swept[key] = [str(v) for v in override.sweep_string_iterator()]
        else:
            swept[key] = [override.get_value_element_as_str()]
    return swept


def measured_step_times(sources: list[Path]) -> dict[tuple[str, str], float]:
    """Median step time per (row, task) over the completed runs of stores (.jsonl) and runs
    folders; a row is ``method@budget``, or ``method`` alone for one whose step does not depend
    on the budget (:func:`experiments.methods.row_name`: full, BitFit, ...)."""
    from analysis.store import read_store  # analysis reads experiments, not the other way round at import

    records: list[dict] = []
    for source in sources:
        found = read_store(source) if source.suffix == ".jsonl" else [read_results(p) for p in source.rglob(RESULTS)]
        if not found:
            raise ValueError(f"--step-times {source}: no runs there (a store is a .jsonl file, a runs folder holds {RESULTS} files)")
        records += found
    times: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r.get("status") == "completed" and r.get("step_time_s"):
            times.setdefault((row_name(r["method"], r["budget"]), r["task"]), []).append(float(r["step_time_s"]))
    return {key: statistics.median(values) for key, values in times.items()}


def step_time(step_times: dict[tuple[str, str], float], row: str, task: str, default: Optional[float]) -> tuple[float, str]:
    """The step time of ``row`` on ``task`` and where it comes from, the first that exists of:
    measured on that task; scaled from the row's other tasks by how much slower or faster
    ``task`` is for the rows measured on both (the median of ``t(row, other) * t(r, task) /
    t(r, other)``: a task's sequence lengths set the step time as much as the method does);
    the median of the other rows on ``task``; the median of the row's other tasks;
    ``default`` (``--step-time``)."""
    if (row, task) in step_times:
        return step_times[row, task], task
    own = {t: value for (r, t), value in step_times.items() if r == row}
    on_task = {r: value for (r, t), value in step_times.items() if t == task}
    scaled = [own[t] * on_task[r] / step_times[r, t] for t in own for r in on_task if (r, t) in step_times]
    if scaled:
        return statistics.median(scaled), "other tasks, scaled"
    if on_task:
        return statistics.median(on_task.values()), "other methods"
    if own:
        return statistics.median(own.values()), "other tasks"
    if default is None:
        measured = sorted({r for r, _ in step_times})
        raise ValueError(f"no measured step time for {row} (measured: {', '.join(measured) or 'none'}); give --step-time")
    return default, "--step-time"


def training_rows(cfg: Any, cache: dict[tuple, int]) -> int:
    """The training rows a run of ``cfg`` trains on."""
    key = (cfg.task.name, cfg.data.dir)
    if key not in cache:
        cache[key] = len(load_split(cfg.task, cfg.task.train_split, cfg.data.dir, cfg.data.cache_dir))
    n = min(cache[key], cfg.task.max_train_samples or cache[key])
    if Stage(cfg.selection.stage) is Stage.select and Rule(cfg.selection.rule) is Rule.holdout:
        n -= math.ceil(n * cfg.selection.holdout_fraction)
    return n


def combinations(swept: dict[str, list[str]], keys: list[str]) -> list[list[str]]:
    """The overrides of every combination of one value of each of ``keys`` (a sweep's, :func:`sweep`)."""
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(swept[k] for k in keys))]


def cells(swept: dict[str, list[str]]) -> list[list[str]]:
    """The overrides of each cell of a sweep (:func:`sweep`): one value of every key but those
    in :data:`COUNTED_ONLY`."""
    return combinations(swept, [k for k in swept if k not in COUNTED_ONLY])


def finished_identities(cfg: Any) -> list[dict[str, Any]]:
    """The identity configs (:func:`experiments.storage.identity_config`) of the finished runs
    (completed or diverged) of ``cfg``'s cell under its runs folder: those a re-run skips while
    their data and weights are unchanged."""
    folder = cell_folder(cfg, Path(cfg.paths.runs))
    return [identity_config(OmegaConf.load(path.parent / CONFIG)) for path in sorted(folder.glob(f"*/{RESULTS}"))
            if finished_results(path.parent)]


def owes_edge_run(cfg: Any) -> bool:
    """Whether ``cfg``'s selection cell owes a run past the grid's edge now (:func:`owed_factor`
    of its finished selection runs, with ``selection.extend_edges``)."""
    if Stage(cfg.selection.stage) is not Stage.select or not cfg.selection.extend_edges:
        return False
    return owed_factor(factor_scores(cfg, Path(cfg.paths.runs))) is not None


def estimate(overrides: list[str], step_times: dict[tuple[str, str], float], default_step: Optional[float]) -> pd.DataFrame:
    """One line per composed cell: runs (the sweep's and one a best factor at the grid's edge owes,
    :func:`owes_edge_run`), those already finished, steps per run, step time (and what it was
    measured on), hours of the runs not finished."""
    register_configs()
    methods = load_methods()
    swept = sweep(overrides)
    repeats = combinations(swept, [k for k in swept if k in COUNTED_ONLY])  # a cell's runs
    cache: dict[tuple, int] = {}
    lines = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        for cell in cells(swept):
            runs = [hydra_compose(config_name="config", overrides=[*cell, *extra]) for extra in repeats]
            cfg, finished = runs[0], finished_identities(runs[0])
            done, edge = sum(identity_config(run) in finished for run in runs), int(owes_edge_run(cfg))
            row = row_name(cfg.method.name, cfg.budget.name)
            if methods[cfg.method.name].trains:
                step, source = step_time(step_times, row, cfg.task.name, default_step)
                steps = planned_optimizer_steps(cfg, training_rows(cfg, cache))
            else:
                step, source, steps = 0.0, "trains nothing", 0
            lines.append({"cell": row, "task": cfg.task.name, "runs": len(runs) + edge, "past edge": edge, "done": done, "steps/run": steps,
                          "step (s)": step, "step measured on": source, "hours": (len(runs) + edge - done) * steps * step / 3600})
    return pd.DataFrame(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="the overrides run.py -m would get")
    parser.add_argument("--step-times", type=Path, action="append", default=[],
                        help="a store (.jsonl) or runs folder to take median step times from; repeatable")
    parser.add_argument("--step-time", type=float, help="seconds per optimizer step for cells without a measured one")
    args = parser.parse_args()
    try:
        table = estimate(args.overrides, measured_step_times(args.step_times), args.step_time)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(table.to_markdown(index=False, floatfmt=".3g"))
    owed = table["runs"] - table["done"]
    print(f"\n{int(table['runs'].sum())} runs ({int(table['past edge'].sum())} past a grid's edge, {int(table['done'].sum())} finished already), "
          f"{int((owed * table['steps/run']).sum())} optimizer steps owed, {table['hours'].sum():.1f} hours of training on this "
          "machine's step times (evaluation not counted)")


if __name__ == "__main__":
    main()
