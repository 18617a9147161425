"""A study's committed results store: ``results/<study>.jsonl``, one run a line.

Each line is the run's results.json without its bulky per-step fields (evaluation and loss
histories, traceback; the best epoch is kept in ``metrics_best``) and never any weights,
plus ``run`` (the run folder, relative to the parent of the runs folder it was read from:
``<runs folder name>/<task>/<model>/<method>-<budget>/seed<k>-<hash>``) and ``store_schema``.
Lines are sorted by ``run``, so the file diffs cleanly in git. Refreshing a study replaces
the lines of runs read again and keeps the others; ``--drop`` retires the lines whose ``run``
matches a glob (runs of a protocol that changed), before the runs folders are read:

    python -m analysis.store --study glue_minilm_cpu --runs runs/glue_minilm_cpu_select --runs runs/glue_minilm_cpu
    python -m analysis.store --study glue_minilm_cpu --drop '*/rte/*' --runs ...
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.collect import flatten
from experiments.storage import RESULTS, atomic_write_text, read_results

STORE_DIR = Path(__file__).resolve().parent.parent / "results"
STORE_SCHEMA = 1
BULKY = ("eval_history", "train_loss_history", "traceback")


def store_path(study: str, store_dir: Path = STORE_DIR) -> Path:
    return Path(store_dir) / f"{study}.jsonl"


def store_record(results: dict[str, Any], run: str) -> dict[str, Any]:
    """One line of the store: ``results`` without the bulky fields, with ``run``."""
    record = {k: v for k, v in results.items() if k not in BULKY}
    return {**record, "run": run, "store_schema": STORE_SCHEMA}


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
    return [store_record(read_results(p), f"{runs.name}/{p.parent.relative_to(runs).as_posix()}") for p in paths]


def refresh_store(study: str, runs_folders: list[Path], store_dir: Path = STORE_DIR, drop: tuple[str, ...] = ()) -> Path:
    """Drop the records whose ``run`` matches a glob in ``drop``, then add or replace the
    records of ``runs_folders``' runs in the study's store; returns its path."""
    path = store_path(study, store_dir)
    kept = [r for r in (read_store(path) if path.is_file() else []) if not any(fnmatch.fnmatch(r["run"], g) for g in drop)]
    records = {r["run"]: r for r in kept}
    for folder in runs_folders:
        records.update({r["run"]: r for r in runs_records(folder)})
    lines = [json.dumps(records[run], sort_keys=True, default=str) for run in sorted(records)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def load_store(path: Path) -> pd.DataFrame:
    """The store as the tables read runs: one flattened row per run, ``run_dir`` = ``run``."""
    records = read_store(path)
    if not records:
        raise ValueError(f"{path}: the store is empty")
    return flatten([{**r, "run_dir": r["run"]} for r in records])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="the store's name: results/<study>.jsonl")
    parser.add_argument("--runs", type=Path, action="append", required=True, help="a runs folder (repeat for several)")
    parser.add_argument("--drop", action="append", default=[], help="retire the stored runs matching this glob (repeatable)")
    parser.add_argument("--store-dir", type=Path, default=STORE_DIR)
    args = parser.parse_args()
    path = refresh_store(args.study, args.runs, args.store_dir, tuple(args.drop))
    print(f"{path}: {len(read_store(path))} runs")


if __name__ == "__main__":
    main()
