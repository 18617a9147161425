"""A study's committed results store: ``results/<study>.jsonl``, one run a line.

Each line is the run's results.json without its bulky fields (the loss history, the traceback,
the evaluations' timings; from schema 3 it keeps each evaluation's scores where the run's
results.json has them, not in runs restored from an older line, so a figure derived from them,
such as the best epoch in ``metrics_best``, can be derived again from the store) and never any
weights, plus ``run`` (the run folder, relative to the parent of the runs folder it was read
from: ``<runs folder name>/<task>/<model>/<method>-<budget>/seed<k>-<hash>``), ``config`` (the
run's resolved config.yaml; schema 2, absent from lines stored before) and ``store_schema``.
Lines are sorted by ``run``, so the file diffs cleanly in git. Refreshing a study replaces the
lines of runs read again and keeps the others; ``--drop`` retires the lines whose ``run``
matches a glob (runs of a protocol that changed), before the runs folders are read. Refreshes of
one store take turns (:func:`store_lock`), so two study commands side by side never drop each
other's lines. ``--restore`` writes the stored runs back as run folders (results.json and
config.yaml) under a folder, so that a study resumes from the committed store on another
machine: a re-run skips the runs restored, and final runs read the restored selection runs:

    python -m analysis.store --study glue_minilm_cpu --runs runs/glue_minilm_cpu_select --runs runs/glue_minilm_cpu
    python -m analysis.store --study glue_minilm_cpu --drop '*/rte/*' --runs ...
    python -m analysis.store --study glue_minilm_cpu --restore runs
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from analysis.collect import flatten
from experiments.metrics import EVAL_TIMINGS
from experiments.storage import CONFIG, RESULTS, atomic_write_text, exclusive_lock, read_results, write_config, write_results

STORE_DIR = Path(__file__).resolve().parent.parent / "results"
STORE_SCHEMA = 3  # 2: lines keep the run's config; 3: and its evaluations' scores (eval_history)
BULKY = ("train_loss_history", "traceback")
STORE_FIELDS = ("run", "config", "store_schema")  # what a line adds to the run's results.json


def store_path(study: str, store_dir: Path = STORE_DIR) -> Path:
    return Path(store_dir) / f"{study}.jsonl"


def store_record(results: dict[str, Any], run: str, config: dict[str, Any] | None) -> dict[str, Any]:
    """One line of the store: ``results`` without the bulky fields (its evaluations without
    their timings), with ``run`` and ``config``."""
    record = {k: v for k, v in results.items() if k not in BULKY}
    if "eval_history" in record:
        record["eval_history"] = [{k: v for k, v in entry.items() if not k.endswith(EVAL_TIMINGS)} for entry in record["eval_history"]]
    return {**record, **dict(zip(STORE_FIELDS, (run, config, STORE_SCHEMA), strict=True))}


def read_store(path: Path) -> list[dict[str, Any]]:
    """The store's records; a line that does not parse raises with its file and line number."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON record: {error}") from None
    return records


def runs_records(runs: Path) -> list[dict[str, Any]]:
    """Store records of every results.json under ``runs``."""
    runs = Path(runs)
    paths = sorted(runs.rglob(RESULTS))
    if not paths:
        raise FileNotFoundError(f"no {RESULTS} under {runs}")
    return [store_record(read_results(p), f"{runs.name}/{p.parent.relative_to(runs).as_posix()}", run_config(p.parent)) for p in paths]


def run_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's resolved config.yaml as a dict; None for a run folder without one."""
    path = run_dir / CONFIG
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else None


def store_lock(path: Path) -> Path:
    """The lock file a refresh of the store ``path`` holds (beside it, hidden, not committed)."""
    return path.with_name(f".{path.name}.lock")


def refresh_store(study: str, runs_folders: list[Path], store_dir: Path = STORE_DIR, drop: tuple[str, ...] = ()) -> Path:
    """Drop the records whose ``run`` matches a glob in ``drop``, then add or replace the
    records of ``runs_folders``' runs in the study's store; returns its path. The whole
    read-modify-write holds :func:`store_lock`: a second refresh waits, then reads what the
    first wrote."""
    path = store_path(study, store_dir)
    with exclusive_lock(store_lock(path)):
        kept = [r for r in (read_store(path) if path.is_file() else []) if not any(fnmatch.fnmatch(r["run"], g) for g in drop)]
        records = {r["run"]: r for r in kept}
        for folder in runs_folders:
            records.update({r["run"]: r for r in runs_records(folder)})
        lines = [json.dumps(records[run], sort_keys=True, default=str) for run in sorted(records)]
        atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def restore_runs(path: Path, parent: Path) -> tuple[list[Path], list[str]]:
    """Write each stored run that kept its config back as a run folder under ``parent``
    (``parent/<run>``: results.json without the bulky fields, and config.yaml), leaving a
    folder that already holds a results.json as it is. Returns the folders written and the
    runs that could not be (stored without their config, before schema 2)."""
    written, without_config = [], []
    for record in read_store(path):
        folder = Path(parent) / record["run"]
        if record.get("config") is None:
            without_config.append(record["run"])
        elif not (folder / RESULTS).exists():
            write_config(folder, OmegaConf.create(record["config"]))
            write_results(folder, {k: v for k, v in record.items() if k not in STORE_FIELDS})  # last: a run is restored once it is there
            written.append(folder)
    return written, without_config


def load_store(path: Path) -> pd.DataFrame:
    """The store as the tables read runs: one flattened row per run (:func:`table_record`)."""
    records = read_store(path)
    if not records:
        raise ValueError(f"{path}: the store is empty")
    return flatten([table_record(r) for r in records])


def table_record(record: dict[str, Any]) -> dict[str, Any]:
    """A stored line as the tables read it: without its config but for the one setting they
    need from it (``selection.extend_edges``, which results.json does not record), plus ``run_dir``."""
    row = {k: v for k, v in record.items() if k != "config"}
    extend_edges = ((record.get("config") or {}).get("selection") or {}).get("extend_edges")
    if extend_edges is not None:
        row["selection"] = {**row.get("selection", {}), "extend_edges": extend_edges}
    return {**row, "run_dir": record["run"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="the store's name: results/<study>.jsonl")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--runs", type=Path, action="append", help="a runs folder to store (repeat for several)")
    action.add_argument("--restore", type=Path, metavar="FOLDER", help="write the stored runs back as run folders under FOLDER (e.g. runs)")
    parser.add_argument("--drop", action="append", default=[], help="retire the stored runs matching this glob (repeatable)")
    parser.add_argument("--store-dir", type=Path, default=STORE_DIR)
    args = parser.parse_args()
    if args.restore is not None:
        written, without_config = restore_runs(store_path(args.study, args.store_dir), args.restore)
        print(f"{len(written)} runs restored under {args.restore}", end="")
        print(f"; {len(without_config)} stored without their config (schema 1) not restored" if without_config else "")
        return
    path = refresh_store(args.study, args.runs, args.store_dir, tuple(args.drop))
    print(f"{path}: {len(read_store(path))} runs")


if __name__ == "__main__":
    main()
