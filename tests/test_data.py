"""Loaders for the real GLUE on-disk formats (TSV folders and the hub's parquet layout)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import write_glue_task
from experiments.config import compose
from experiments.data import DataError, load_split


def task_cfg(name: str):
    return compose([f"task={name}"]).task


@pytest.mark.parametrize(
    "task,folder,first_label",
    [("rte", "RTE", 0), ("mrpc", "MRPC", 0), ("cola", "CoLA", 0), ("stsb", "STS-B", 0.0), ("sst2", "SST-2", 0)],
)
def test_tsv_splits(glue_dir: Path, task: str, folder: str, first_label: float) -> None:
    cfg = task_cfg(task)
    train = load_split(cfg, "train", str(glue_dir))
    dev = load_split(cfg, "validation", str(glue_dir))
    assert (len(train), len(dev)) == (24, 12)
    assert set(train.column_names) == set(cfg.text_fields) | {"label"}
    assert train[0]["label"] == first_label
    assert train[0][cfg.text_fields[0]] == "A man is playing a guitar."


def test_rte_string_labels_map_to_hub_ids(glue_dir: Path) -> None:
    train = load_split(task_cfg("rte"), "train", str(glue_dir))
    assert train["label"][:4] == [0, 1, 0, 1]  # entailment=0, not_entailment=1 as on the hub


def test_lone_quote_is_kept_verbatim(glue_dir: Path) -> None:
    train = load_split(task_cfg("rte"), "train", str(glue_dir))
    assert train[1]["sentence2"] == 'He said "no to the offer.'


def test_mrpc_bom_is_stripped(glue_dir: Path) -> None:
    train = load_split(task_cfg("mrpc"), "train", str(glue_dir))
    assert train["label"][:2] == [0, 1]


def test_stsb_scores_are_floats(glue_dir: Path) -> None:
    train = load_split(task_cfg("stsb"), "train", str(glue_dir))
    assert train["label"][:3] == pytest.approx([0.0, 0.8, 1.6])


def test_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    folder = write_glue_task(tmp_path, "RTE")
    lines = (folder / "train.tsv").read_text().splitlines()
    lines[3] = lines[3].replace("\t", " ", 1)  # line 4 of the file loses a column
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.tsv:4: expected 4"):
        load_split(task_cfg("rte"), "train", str(tmp_path))


def test_label_outside_label_set(tmp_path: Path) -> None:
    folder = write_glue_task(tmp_path, "RTE")
    text = (folder / "dev.tsv").read_text().replace("not_entailment", "contradiction", 1)
    (folder / "dev.tsv").write_text(text)
    with pytest.raises(DataError, match=r"dev\.tsv:3: label 'contradiction' is not in the label set"):
        load_split(task_cfg("rte"), "validation", str(tmp_path))


def test_missing_split_is_named(tmp_path: Path) -> None:
    folder = write_glue_task(tmp_path, "RTE")
    (folder / "dev.tsv").unlink()
    with pytest.raises(DataError, match="split 'validation' of rte not found"):
        load_split(task_cfg("rte"), "validation", str(tmp_path))


def test_hub_parquet_layout(tmp_path: Path) -> None:
    folder = tmp_path / "mrpc"
    folder.mkdir()
    frame = pd.DataFrame(
        {"sentence1": ["a b", "c d", "e f"], "sentence2": ["a", "c", "e"], "label": [1, 0, 1], "idx": [0, 1, 2]}
    )
    frame.to_parquet(folder / "train-00000-of-00001.parquet")
    train = load_split(task_cfg("mrpc"), "train", str(tmp_path))
    assert train["label"] == [1, 0, 1]
    assert train["sentence1"] == ["a b", "c d", "e f"]
    frame.assign(label=[1, 0, 5]).to_parquet(folder / "validation-00000-of-00001.parquet")
    with pytest.raises(DataError, match="label '5' is not in the label set"):
        load_split(task_cfg("mrpc"), "validation", str(tmp_path))
