"""Load a task's splits from the hub or from local files in their real on-disk formats.

Sources, in the order they are tried when ``data.dir`` is given:

1. The task's own file ``<dir>/<local_name>/<task.files[split]>`` (default: GLUE's
   ``train.tsv`` / ``dev.tsv``), read by its extension:

   - ``.tsv``: an original GLUE TSV file. Read with tab separator and no quote handling
     (lone ``"`` occur in RTE and STS-B), BOM stripped (MRPC). The task's ``tsv`` block names
     the columns (by header name, or by index for CoLA, which has no header).
   - ``.json``: an LLM-Adapters commonsense file (a JSON list of ``instruction``, ``input``,
     ``output``, ``answer``); question and choices are parsed out of the instruction, which
     is kept verbatim for the causal-LM mode.
   - ``.jsonl``: rows in the hub's schema (PIQA's original ``valid.jsonl``), labels from the
     aligned ``<stem>-labels.lst`` beside it when the rows carry none.
2. The hub's parquet layout: ``<dir>/<config>/<split>-*.parquet`` (or under ``<TASK>/``).

Without ``data.dir``, an embedded task (the default experiment's GLUE RTE, shipped in
``experiments/embedded_data/`` with its provenance and licence) is read from the package as
if it were ``data.dir``; any other task comes from ``datasets.load_dataset(hub_path,
hub_config)``. A hub that cannot be reached (offline) raises :class:`DataError` in one line
naming ``data.dir``, the hub name and the embedded tasks.
Multiple-choice tasks (``task.task_type: multiple_choice``) come out as ``context`` (str),
``choices`` (list of str) and ``label`` (int); the task's ``mc_columns`` block says how the
hub's columns map onto them. Every row is checked: a wrong column count or a label outside
the task's label set raises :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import datasets
import numpy as np
import pandas as pd
import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

Label = Union[int, float]

# split name -> GLUE TSV file name
TSV_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
# LLM-Adapters instructions: "<intro>: <question>\n\n<Word>1: <choice> <Word>2: ... Answer format: ..."
CHOICE_MARK = re.compile(r"\s*\b(?:Solution|Answer|Option|Ending)(\d+): ")
ANSWER_FORMAT = re.compile(r"\s*Answer format:.*$", re.DOTALL)


# the default experiment's data, shipped inside the package (README.md there)
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded_data"


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
    lowered = [name.lower() for name in task.label_names]
    if value.lower() in lowered:
        return lowered.index(value.lower())
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


def read_text(path: Path) -> str:
    """A file's UTF-8 text (a leading BOM dropped, line endings kept); bytes that are not
    UTF-8 raise :class:`DataError` with the file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#x} at offset {error.start})") from None


def read_json(path: Path) -> Any:
    """A JSON file; a truncated or malformed one raises :class:`DataError` with the file and line."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not complete JSON ({error.msg}, column {error.colno})") from None


def read_glue_tsv(path: Path, task: Any) -> dict[str, list]:
    """Read one GLUE TSV file into columns ``task.text_fields + [label]``."""
    layout = task.tsv
    has_header = layout.header
    rows = list(csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path}: file is empty")
    header = [c.strip() for c in rows[0]] if has_header else None
    if header is None and layout.n_columns is None:
        raise DataError(f"{path}: task {task.name} reads a TSV without a header, which needs task.tsv.n_columns")
    n_columns = len(header) if header is not None else int(layout.n_columns)
    text_idx = [_column_index(c, header, path) for c in layout.text_columns]
    label_idx = _column_index(layout.label_column, header, path)
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
    if not columns[task.label_field]:
        raise DataError(f"{path}: no data rows{' after the header' if has_header else ''}")
    return columns


def read_parquet(paths: list[Path], task: Any) -> dict[str, list]:
    frame = pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)
    if task.task_type == "multiple_choice":
        return multiple_choice_columns(frame.to_dict(orient="list"), task, str(paths[0]))
    needed = list(task.text_fields) + [task.label_field]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{paths[0]}: missing columns {missing}; found {list(frame.columns)}")
    columns = {f: frame[f].astype(str).tolist() for f in task.text_fields}
    columns[task.label_field] = [
        parse_label(str(v), task, f"{paths[0]}: row {i}") for i, v in enumerate(frame[task.label_field])
    ]
    return columns


def _field(columns: dict[str, list], name: str, row: int) -> Any:
    """Row ``row`` of column ``name``; a dotted name (``choices.text``) reads a struct's key."""
    head, _, key = name.partition(".")
    value = columns[head][row]
    return value[key] if key else value


def multiple_choice_columns(columns: dict[str, list], task: Any, where: str) -> dict[str, list]:
    """Rows in the hub's schema -> ``context``, ``choices``, ``label`` as ``task.mc_columns`` says:
    ``context`` (columns joined by a space), ``choices`` (one column per choice) or
    ``choices_list`` (a column holding the list), ``label`` with ``label_base`` (its first
    value, 1 for "1".."3") or ``label_keys`` (a column of keys the label is one of: ARC's "A".."E");
    ``keep``: further columns copied as they are where present (HellaSwag's, for lm-eval's prompt)."""
    spec = task.mc_columns
    kept = [name for name in spec.keep if name in columns]
    named = [*spec.context, *spec.choices, spec.choices_list or "", spec.label, spec.label_keys or ""]
    missing = sorted({n.partition(".")[0] for n in named if n} - set(columns))
    if missing:
        raise DataError(f"{where}: missing columns {missing}; found {sorted(columns)}")
    out: dict[str, list] = {"context": [], "choices": [], "label": [], **{name: [str(v) for v in columns[name]] for name in kept}}
    for row in range(len(columns[spec.label.partition(".")[0]])):
        if spec.choices:
            choices = [str(_field(columns, c, row)) for c in spec.choices]
        else:
            choices = [str(c) for c in _field(columns, spec.choices_list, row)]
        raw = str(_field(columns, spec.label, row)).strip()
        if spec.label_keys:
            keys = [str(k) for k in _field(columns, spec.label_keys, row)]
            label = keys.index(raw) if raw in keys else -1
        else:
            label = int(raw) - spec.label_base if raw.lstrip("-").isdigit() else -1
        if not 0 <= label < len(choices):
            raise DataError(f"{where}: row {row}: label {raw!r} names none of its {len(choices)} choices")
        out["context"].append(" ".join(str(_field(columns, c, row)) for c in spec.context).strip())
        out["choices"].append(choices)
        out["label"].append(label)
    return out


def parse_instruction(instruction: str, where: str) -> tuple[str, list[str]]:
    """Question and choices of an LLM-Adapters instruction (no choices: BoolQ's true/false)."""
    _, colon, rest = instruction.partition(": ")
    if not colon:
        raise DataError(f"{where}: instruction has no '<intro>: <question>' part: {instruction[:80]!r}")
    parts = CHOICE_MARK.split(ANSWER_FORMAT.sub("", rest))
    return parts[0].strip(), [choice.strip() for choice in parts[2::2]]


def read_llm_adapters_json(paths: list[Path], task: Any) -> dict[str, list]:
    """An LLM-Adapters file: multiple-choice tasks get ``context``/``choices``/``label`` (the
    answer ``solution2`` is choice 1); classification tasks (BoolQ, whose file holds the
    question but not the passage) get the question as their first text field, the others
    empty. The ``instruction`` column is kept for the causal-LM mode."""
    path = paths[0]
    records = read_json(path)
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of items")
    multiple_choice = task.task_type == "multiple_choice"
    columns: dict[str, list] = (
        {"context": [], "choices": [], "label": []} if multiple_choice else {f: [] for f in [*task.text_fields, task.label_field]}
    )
    columns["instruction"] = []
    for i, record in enumerate(records):
        where = f"{path}: item {i}"
        if not isinstance(record, dict) or not {"instruction", "answer"} <= record.keys():
            raise DataError(f"{where}: expected an object with 'instruction' and 'answer'")
        question, choices = parse_instruction(record["instruction"], where)
        answer = record["answer"].strip()
        if multiple_choice:
            number = re.fullmatch(r"[a-z]+(\d+)", answer)
            label = int(number.group(1)) - 1 if number else -1
            if not 0 <= label < len(choices):
                raise DataError(f"{where}: answer {answer!r} names none of its {len(choices)} choices")
            columns["context"].append(question)
            columns["choices"].append(choices)
        else:
            label = parse_label(answer, task, where)
            for k, name in enumerate(task.text_fields):
                columns[name].append(question if k == 0 else "")
        columns["label" if multiple_choice else task.label_field].append(label)
        columns["instruction"].append(record["instruction"])
    return columns


def read_jsonl(paths: list[Path], task: Any) -> dict[str, list]:
    """Rows in the hub's schema, one JSON object a line; labels from ``<stem>-labels.lst``
    (one a line, aligned) when the rows have none (PIQA's original files)."""
    path = paths[0]
    rows = []
    for line_no, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_no}: not a complete JSON object ({error.msg})") from None
    columns = {key: [row.get(key) for row in rows] for key in rows[0]} if rows else {}
    label_column = task.mc_columns.label
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    if label_column not in columns and labels_path.is_file():
        labels = labels_path.read_text(encoding="utf-8").split()
        if len(labels) != len(rows):
            raise DataError(f"{labels_path}: {len(labels)} labels for the {len(rows)} rows of {path.name}")
        columns[label_column] = labels
    return multiple_choice_columns(columns, task, str(path))


READERS = {
    "tsv": lambda paths, task: read_glue_tsv(paths[0], task),
    "json": read_llm_adapters_json,
    "jsonl": read_jsonl,
    "parquet": read_parquet,
}


def find_local_split(data_dir: Path, task: Any, split: str) -> tuple[str, list[Path]]:
    """Locate a split in ``data_dir``: (extension, [file]) or ("parquet", files)."""
    if not data_dir.is_dir():
        raise DataError(f"data.dir {data_dir} is not a folder")
    file_name = task.files.get(split, TSV_FILES.get(split, f"{split}.tsv"))
    file_path = data_dir / task.local_name / file_name
    if file_path.is_file():
        return file_path.suffix.lstrip("."), [file_path]
    folders = [data_dir / task.hub_config, data_dir / task.local_name]
    for folder in folders:
        parquet = sorted(folder.glob(f"{split}-*.parquet")) + sorted(folder.glob(f"{split}.parquet"))
        if parquet:
            return "parquet", parquet
    raise DataError(
        f"split {split!r} of {task.name} not found in {data_dir}: looked for {file_path} "
        f"and {' or '.join(str(f) for f in folders)}/{split}-*.parquet"
    )


def embedded_tasks() -> list[str]:
    """The folder names of the embedded tasks (``local_name``: ``RTE``)."""
    return sorted(p.name for p in EMBEDDED_DIR.iterdir() if p.is_dir())


def is_embedded(task: Any, split: str) -> bool:
    """Whether ``split`` of ``task`` ships inside the package (a GLUE task's TSV file)."""
    file_name = task.files.get(split, TSV_FILES.get(split, f"{split}.tsv"))
    return task.hub_path == "nyu-mll/glue" and (EMBEDDED_DIR / task.local_name / file_name).is_file()


def data_source(task: Any, data_dir: Optional[str]) -> str:
    """Where :func:`load_split` reads ``task``'s evaluation split from, in words."""
    if data_dir is not None:
        return f"data.dir={data_dir}"
    if is_embedded(task, task.eval_split):
        return f"the embedded files ({EMBEDDED_DIR / task.local_name})"
    return f"the hub ({task.hub_path}, {task.hub_config})"


def load_hub_split(task: Any, split: str, cache_dir: Optional[str]) -> datasets.Dataset:
    """``datasets.load_dataset(hub_path, hub_config)``; an unreachable hub is one line."""
    try:
        return datasets.load_dataset(task.hub_path, task.hub_config, split=split, cache_dir=cache_dir)
    except ConnectionError as error:
        raise DataError(
            f"no data for {task.name} {split}: data.dir is not set, it is not embedded (embedded: "
            f"{', '.join(embedded_tasks())}) and the hub's {task.hub_path!r} ({task.hub_config}) cannot be "
            f"reached ({str(error).splitlines()[0]}); set data.dir=<folder with {task.local_name}/> or connect to the hub"
        ) from None


def split_folder(task: Any, split: str, data_dir: Optional[str]) -> Optional[Path]:
    """The folder a split is read from: ``data_dir``, else the embedded files; None: the hub."""
    if data_dir is not None:
        return Path(data_dir)
    return EMBEDDED_DIR if is_embedded(task, split) else None


def load_split(task: Any, split: str, data_dir: Optional[str], cache_dir: Optional[str] = None) -> datasets.Dataset:
    """One split as a ``datasets.Dataset``: the task's text fields and integer/float label, or
    for a multiple-choice task ``context``, ``choices`` and ``label`` (plus ``instruction`` from
    LLM-Adapters files). Read from ``data_dir``, else from the embedded files, else the hub."""
    folder = split_folder(task, split, data_dir)
    if folder is None:
        ds = load_hub_split(task, split, cache_dir)
        if task.task_type == "multiple_choice":
            return datasets.Dataset.from_dict(multiple_choice_columns(ds.to_dict(), task, f"{task.hub_path} {split}"))
        keep = list(task.text_fields) + [task.label_field]
        ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
        if ds.features[task.label_field].dtype == "bool":  # BoolQ's answer
            ds = ds.cast_column(task.label_field, datasets.Value("int64"))
        return ds
    kind, paths = find_local_split(folder, task, split)
    if kind not in READERS:
        raise DataError(f"{paths[0]}: no reader for .{kind} files (valid: {', '.join(READERS)})")
    return datasets.Dataset.from_dict(READERS[kind](paths, task))


def subsample(ds: datasets.Dataset, limit: Optional[int], seed: int) -> datasets.Dataset:
    """The first ``limit`` rows after a seeded shuffle (all rows when ``limit`` is None)."""
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit))


def task_rows(task: Any, split: str, data_dir: Any, cache_dir: Any, seed: int) -> datasets.Dataset:
    """A split of the task as a run reads it: subsampled to ``task.max_train_samples`` for the
    training split, to ``task.max_eval_samples`` for any other."""
    limit = task.max_train_samples if split == task.train_split else task.max_eval_samples
    return subsample(load_split(task, split, data_dir, cache_dir), limit, seed)


def choice_pair(context: str, choice: str, blank: Optional[str]) -> tuple[str, str]:
    """The two segments an encoder reads for one choice: (context, choice); with a ``blank``
    in the context (WinoGrande's ``_``), the choice fills it and the segments are the sentence
    up to and including the choice, and the rest (the WinoGrande paper's RoBERTa set-up)."""
    if blank is None or blank not in context:
        return context, choice
    before, after = context.split(blank, 1)
    return before + choice, after.strip()


class TruncationError(DataError):
    """Inputs longer than ``task.max_length`` while ``task.allow_truncation`` is false."""


def count_truncated(task: Any, split: str, lengths: list[int]) -> int:
    """How many of ``lengths`` (untruncated token counts, one per example) exceed
    ``task.max_length``; an error naming that count unless ``task.allow_truncation``."""
    n_cut = sum(length > task.max_length for length in lengths)
    if n_cut and not task.allow_truncation:
        raise TruncationError(
            f"task.max_length={task.max_length} would cut {n_cut} of {len(lengths)} {task.name} {split} examples "
            f"(longest: {max(lengths)} tokens); raise task.max_length or set task.allow_truncation=true"
        )
    return n_cut


def tokenize_counted(ds: datasets.Dataset, task: Any, tokenizer: Any, split: str = "") -> tuple[datasets.Dataset, int]:
    """Tokenize without padding (the collator pads each batch dynamically). A multiple-choice
    row becomes one (context, choice) pair per choice, kept together in one row. Also the
    number of examples cut to ``task.max_length`` (:func:`count_truncated`: an error unless
    ``task.allow_truncation``)."""

    def encode(batch: dict[str, list], truncation: bool) -> dict[str, list]:
        texts = [batch[f] for f in task.text_fields]
        out = tokenizer(*texts, truncation=truncation, max_length=task.max_length if truncation else None)
        out["labels"] = batch[task.label_field]
        return out

    def encode_choices(batch: dict[str, list], truncation: bool) -> dict[str, list]:
        sizes = [len(choices) for choices in batch["choices"]]
        pairs = [choice_pair(context, choice, task.blank) for context, choices in zip(batch["context"], batch["choices"]) for choice in choices]
        flat = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation=truncation, max_length=task.max_length if truncation else None)
        starts = np.cumsum([0, *sizes])
        out = {key: [values[a:b] for a, b in zip(starts[:-1], starts[1:])] for key, values in flat.items()}
        out["labels"] = batch["label"]
        return out

    function = encode_choices if task.task_type == "multiple_choice" else encode
    multiple_choice = task.task_type == "multiple_choice"

    def run(truncation: bool) -> datasets.Dataset:
        return ds.map(function, batched=True, remove_columns=ds.column_names, fn_kwargs={"truncation": truncation}, desc=f"tokenize {task.name}")

    full = run(truncation=False)
    lengths = [max(map(len, ids)) if multiple_choice else len(ids) for ids in full["input_ids"]]
    n_cut = count_truncated(task, split or "data", lengths)
    return (run(truncation=True) if n_cut else full), n_cut


def tokenize(ds: datasets.Dataset, task: Any, tokenizer: Any, split: str = "") -> datasets.Dataset:
    """:func:`tokenize_counted` without the count."""
    return tokenize_counted(ds, task, tokenizer, split)[0]


@dataclass
class MultipleChoiceCollator:
    """Pads a batch of multiple-choice rows to ``(batch, n_choices, seq)``, each row's choices
    in its own slice. A row with fewer choices than the batch's most (ARC has 3 to 5) repeats
    its last choice: a copy ties with its original, arg-max picks the first of equal logits, so
    predictions are those over the real choices (in training, the copy shares that choice's
    probability; it occurs in ARC's few 3-choice questions only)."""

    tokenizer: Any

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n_choices = max(len(f["input_ids"]) for f in features)
        flat = [
            {key: values[min(j, len(values) - 1)] for key, values in f.items() if key != "labels"}
            for f in features
            for j in range(n_choices)
        ]
        batch = self.tokenizer.pad(flat, return_tensors="pt")
        batch = {key: value.view(len(features), n_choices, -1) for key, value in batch.items()}
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch


def data_collator(task_type: str, tokenizer: Any) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """The collator of a model head's batches (dynamic padding; causal-LM labels padded with -100)."""
    if task_type == "multiple_choice":
        return MultipleChoiceCollator(tokenizer)
    if task_type == "causal_lm":
        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    return DataCollatorWithPadding(tokenizer)
