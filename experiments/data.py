"""Load a task's splits from the hub or from local files in their real on-disk formats.

Sources, in the order they are tried when ``data.dir`` is given:

1. The original GLUE TSV folders: ``<dir>/<TASK>/train.tsv`` and ``dev.tsv``. Read with tab
   separator and no quote handling (lone ``"`` occur in RTE and STS-B), BOM stripped (MRPC).
   The task's ``tsv`` block names the columns (by header name, or by index for CoLA, which
   has no header).
2. The hub's parquet layout: ``<dir>/<config>/<split>-*.parquet`` (or under ``<TASK>/``).

Without ``data.dir`` the real ``datasets.load_dataset(hub_path, hub_config)`` path is used.
Every row is checked: a wrong column count or a label outside the task's label set raises
:class:`DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional, Union

import datasets
import pandas as pd

Label = Union[int, float]

# split name -> GLUE TSV file name
TSV_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}


class DataError(ValueError):
    """A data file is missing or malformed."""


def parse_label(raw: str, task: Any, where: str) -> Label:
    """Map a label as written in a file to the task's label id (or float score)."""
    value = raw.strip()
    if not task.label_names:
        try:
            score = float(value)
        except ValueError:
            raise DataError(f"{where}: regression label {raw!r} is not a number") from None
        if not math.isfinite(score):
            raise DataError(f"{where}: regression label {raw!r} is not finite")
        return score
    if value in task.label_names:
        return list(task.label_names).index(value)
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(task.label_names):
        return int(value)
    raise DataError(
        f"{where}: label {raw!r} is not in the label set of {task.name} "
        f"({', '.join(task.label_names)} or 0..{len(task.label_names) - 1})"
    )


def _column_index(spec: Union[str, int], header: Optional[list[str]], path: Path) -> int:
    if isinstance(spec, int):
        return spec
    if header is None or spec not in header:
        raise DataError(f"{path}:1: column {spec!r} not found in header {header}")
    return header.index(spec)


def read_glue_tsv(path: Path, task: Any) -> dict[str, list]:
    """Read one GLUE TSV file into columns ``task.text_fields + [label]``."""
    layout = task.tsv
    has_header = bool(layout.get("header", True))
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path}: file is empty")
    header = [c.strip() for c in rows[0]] if has_header else None
    n_columns = len(header) if header is not None else int(layout["n_columns"])
    text_idx = [_column_index(c, header, path) for c in layout["text_columns"]]
    label_idx = _column_index(layout["label_column"], header, path)
    columns: dict[str, list] = {f: [] for f in task.text_fields}
    columns[task.label_field] = []
    first_line = 2 if has_header else 1
    for line_no, row in enumerate(rows[first_line - 1 :], start=first_line):
        if not row:
            continue
        if len(row) != n_columns:
            raise DataError(f"{path}:{line_no}: expected {n_columns} tab-separated columns, found {len(row)}")
        for field_name, idx in zip(task.text_fields, text_idx):
            columns[field_name].append(row[idx])
        columns[task.label_field].append(parse_label(row[label_idx], task, f"{path}:{line_no}"))
    return columns


def read_parquet(paths: list[Path], task: Any) -> dict[str, list]:
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    needed = list(task.text_fields) + [task.label_field]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{paths[0]}: missing columns {missing}; found {list(frame.columns)}")
    columns = {f: frame[f].astype(str).tolist() for f in task.text_fields}
    columns[task.label_field] = [
        parse_label(str(v), task, f"{paths[0]}: row {i}") for i, v in enumerate(frame[task.label_field])
    ]
    return columns


def find_local_split(data_dir: Path, task: Any, split: str) -> tuple[str, list[Path]]:
    """Locate a split in ``data_dir``: ("tsv", [file]) or ("parquet", files)."""
    if not data_dir.is_dir():
        raise DataError(f"data.dir {data_dir} is not a folder")
    tsv_name = task.tsv.get("files", {}).get(split, TSV_FILES.get(split, f"{split}.tsv"))
    tsv_path = data_dir / task.local_name / tsv_name
    if tsv_path.is_file():
        return "tsv", [tsv_path]
    for folder in (data_dir / task.hub_config, data_dir / task.local_name):
        parquet = sorted(folder.glob(f"{split}-*.parquet")) + sorted(folder.glob(f"{split}.parquet"))
        if parquet:
            return "parquet", parquet
    raise DataError(
        f"split {split!r} of {task.name} not found in {data_dir}: looked for {tsv_path} "
        f"and {data_dir / task.hub_config}/{split}-*.parquet"
    )


def load_split(task: Any, split: str, data_dir: Optional[str], cache_dir: Optional[str] = None) -> datasets.Dataset:
    """One split as a ``datasets.Dataset`` with the task's text fields and integer/float label."""
    if data_dir is None:
        ds = datasets.load_dataset(task.hub_path, task.hub_config, split=split, cache_dir=cache_dir)
        keep = list(task.text_fields) + [task.label_field]
        ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
        return ds
    kind, paths = find_local_split(Path(data_dir), task, split)
    columns = read_glue_tsv(paths[0], task) if kind == "tsv" else read_parquet(paths, task)
    return datasets.Dataset.from_dict(columns)


def subsample(ds: datasets.Dataset, limit: Optional[int], seed: int) -> datasets.Dataset:
    """The first ``limit`` rows after a seeded shuffle (all rows when ``limit`` is None)."""
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit))


def tokenize(ds: datasets.Dataset, task: Any, tokenizer: Any) -> datasets.Dataset:
    """Tokenize without padding (the collator pads each batch dynamically)."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[f] for f in task.text_fields]
        out = tokenizer(*texts, truncation=True, max_length=task.max_length)
        out["labels"] = batch[task.label_field]
        return out

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenize {task.name}")
