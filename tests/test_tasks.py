"""GLUE completed: QQP, QNLI and MNLI in their real TSV layouts, MNLI's two dev sets,
``model.init_from`` (starting a task from another run's fine-tuned weights), and the suites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from safetensors.torch import load_file

from experiments.config import CONF_DIR, compose, register_configs
from experiments.data import load_split
from experiments.metrics import compute_metrics
from experiments.models import load_model
from experiments.runner import run


def task_cfg(name: str):
    return compose([f"task={name}"]).task


def test_qqp_columns_and_labels(glue_dir: Path) -> None:
    train = load_split(task_cfg("qqp"), "train", str(glue_dir))
    assert set(train.column_names) == {"question1", "question2", "label"}
    assert train["label"][:4] == [0, 1, 0, 1]
    assert train[1]["question2"] == 'He said "no to the offer.'


def test_qnli_string_labels(glue_dir: Path) -> None:
    dev = load_split(task_cfg("qnli"), "validation", str(glue_dir))
    assert dev["label"][:2] == [0, 1] and dev[0]["question"] == "A man is playing a guitar."


def test_mnli_gold_label_of_train_and_both_dev_files(glue_dir: Path) -> None:
    task = task_cfg("mnli")
    train = load_split(task, "train", str(glue_dir))  # 12 columns
    matched = load_split(task, "validation_matched", str(glue_dir))  # 16 columns
    mismatched = load_split(task, "validation_mismatched", str(glue_dir))
    assert (len(train), len(matched), len(mismatched)) == (24, 12, 6)
    assert train["label"][:3] == [0, 1, 2]  # entailment, neutral, contradiction: the hub's ids
    assert set(matched.column_names) == {"premise", "hypothesis", "label"}


def test_qqp_metric_by_hand() -> None:
    # preds 1 1 0 0 1, labels 1 0 0 1 1: TP 2, FP 1, FN 1 -> F1 = 2/3; accuracy 3/5
    logits = np.eye(2)[[1, 1, 0, 0, 1]]
    result = compute_metrics(task_cfg("qqp").metric, logits, np.array([1, 0, 0, 1, 1]))
    assert result["main"] == pytest.approx(2 / 3) and result["accuracy"] == pytest.approx(0.6)


def test_mnli_reports_matched_and_mismatched(make_cfg, tmp_path: Path) -> None:
    results = json.loads(run(make_cfg("method=lora", "task=mnli"), tmp_path / "mnli").read_text())
    metrics = results["metrics"]
    assert metrics["main"] == metrics["accuracy"] and "accuracy_mm" in metrics and "main_mm" in metrics
    assert results["eval_samples"] == 12 and results["eval_samples_by_split"] == {
        "mnli/validation_matched": 12, "mnli/validation_mismatched": 6,
    }
    assert all(entry["step"] for entry in results["eval_history"])  # no mismatched entry mixed in


@pytest.mark.parametrize("method", ["lora", "taso"])
def test_init_from_mnli_run(make_cfg, tmp_path: Path, method: str) -> None:
    source = tmp_path / "mnli"
    run(make_cfg(f"method={method}", "task=mnli", "trainer.save_model=true", "trainer.max_steps=2"), source)
    saved = load_file(source / "model" / "model.safetensors")
    cfg = make_cfg("method=lora", "task=rte", f"model.init_from={source}")
    loaded = load_model(cfg.model, num_labels=2).state_dict()
    weight = "bert.encoder.layer.0.attention.self.query.weight"  # adapted, merged into the saved weights
    assert torch.equal(loaded[weight], saved[weight]) and loaded["classifier.weight"].shape == (2, 32)
    target = make_cfg("method=lora", "task=rte", f"model.init_from={source}", "trainer.max_steps=1")
    results = json.loads(run(target, tmp_path / "rte").read_text())
    assert results["status"] == "completed" and results["head_params"] == 32 * 2 + 2  # 3-label head re-initialised


def test_save_model_refuses_unmerged_method_layers(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be saved as a plain model"):
        run(make_cfg("method=sora", "trainer.save_model=true", "trainer.max_steps=1"), tmp_path / "sora")
    assert not (tmp_path / "sora" / "model").exists()


def test_init_from_needs_saved_model(make_cfg, tmp_path: Path) -> None:
    source = tmp_path / "plain"
    run(make_cfg("method=lora", "trainer.max_steps=1"), source)
    with pytest.raises(FileNotFoundError, match="trainer.save_model=true"):
        run(make_cfg("method=lora", f"model.init_from={source}"), tmp_path / "rte")


@pytest.mark.parametrize("suite", ["glue", "commonsense"])
def test_suite_sweeps_its_tasks(suite: str) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=[f"suite={suite}"], return_hydra_config=True)
    tasks = cfg.hydra.sweeper.params.task.split(",")
    assert len(tasks) == 8 and {compose([f"task={t}"]).task.suite for t in tasks} == {suite}
