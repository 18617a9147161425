"""A new user's first run: the default experiment on the embedded RTE files from a clean
checkout with no data folder and no network, a quiet console, one line when data is missing,
and the zero-shot / head-only reference rows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import OFFLINE_ENV, REPO
from experiments.config import compose
from experiments.data import EMBEDDED_DIR, DataError, is_embedded, load_split
from experiments.methods import PrepareContext, build_method
from experiments.models import load_model
from experiments.runner import run

TINY_HEAD = 32 * 2 + 2  # model=tiny's classifier on a 2-label task


def clean_checkout(destination: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked + not ignored), nothing else."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


@pytest.mark.slow
def test_default_experiment_runs_from_a_clean_checkout_offline(tmp_path: Path) -> None:
    checkout = clean_checkout(tmp_path / "checkout")
    assert not (checkout / "runs").exists() and not (tmp_path / "data").exists()
    short = ["logger=none", "trainer=fast", "task.max_train_samples=32", "task.max_eval_samples=16", "method.importance_batches=1"]
    result = subprocess.run(
        [sys.executable, "run.py", *short],
        cwd=checkout, env=OFFLINE_ENV, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    results_path = Path(lines[-1])
    assert results_path.is_absolute() or (checkout / results_path).is_file()
    results = json.loads((checkout / results_path).read_text())
    assert (results["status"], results["task"], results["method"], results["model"]) == ("completed", "rte", "taso", "minilm")
    assert (results["train_samples"], results["eval_samples"]) == (32, 16)
    # the data came from the checkout's own embedded files, said in one line
    assert [line for line in lines if line.startswith("data: ")] == [
        f"data: rte from the embedded files ({checkout / 'experiments' / 'embedded_data' / 'RTE'}): train 32, validation 16"
    ]
    # quiet start: one line each for model, data, trainable count; the load report is in run.log
    model_lines = [line for line in lines if line.startswith("model: ")]
    assert len(model_lines) == 1 and "new: classifier.bias, classifier.weight (the task head" in model_lines[0]
    assert sum(line.startswith("trainable: ") for line in lines) == 1
    console = result.stdout + result.stderr
    assert "LOAD REPORT" not in console and "Warning" not in console
    assert "LOAD REPORT" in ((checkout / results_path).parent / "run.log").read_text()


def test_offline_run_without_its_data_fails_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "run.py"),
         "task=mrpc", "model=tiny", "logger=none", f"paths.runs={tmp_path}"],
        cwd=tmp_path, env=OFFLINE_ENV, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()
    assert len(error) == 1, result.stderr
    assert all(part in error[0] for part in ("data.dir", "'nyu-mll/glue'", "embedded: RTE", "mrpc"))


def test_embedded_rte_is_read_without_data_dir_and_data_dir_wins(glue_dir: Path) -> None:
    task = compose(["task=rte"]).task
    assert is_embedded(task, "train") and is_embedded(task, "validation")
    assert not is_embedded(compose(["task=mrpc"]).task, "train")
    train, dev = load_split(task, "train", None), load_split(task, "validation", None)
    assert (len(train), len(dev)) == (2490, 277)  # the official GLUE sizes
    assert set(train["label"]) == {0, 1}
    assert len(load_split(task, "train", str(glue_dir))) == 24  # data.dir first
    assert (EMBEDDED_DIR / "README.md").read_text().count("Licence") == 1


def test_offline_hub_error_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"data.dir is not set.*embedded: RTE.*'nyu-mll/glue'"):
        load_split(compose(["task=cola"]).task, "train", None)


def test_zero_shot_trains_nothing_and_head_only_trains_the_head(make_cfg, tmp_path: Path) -> None:
    zero = json.loads(run(make_cfg("method=zero_shot"), tmp_path / "zero").read_text())
    assert (zero["status"], zero["steps"], zero["train_samples"]) == ("completed", 0, 0)
    assert (zero["trainable_params"], zero["head_params"]) == (0, 0)
    assert set(zero["metrics"]) == {"accuracy", "main", "loss"}
    probe = json.loads(run(make_cfg("method=head_only"), tmp_path / "probe").read_text())
    assert (probe["status"], probe["steps"], probe["trainable_params"], probe["head_params"]) == ("completed", 4, 0, TINY_HEAD)


def test_head_only_trains_only_the_head(make_cfg) -> None:
    cfg = make_cfg("method=head_only")
    model = load_model(cfg.model, num_labels=2)
    ctx = PrepareContext([], ["classifier"], 1, 0, lambda: iter(()), "seq_cls", 0)
    build_method(cfg.method).prepare(model, ctx)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}


def test_head_only_refuses_a_causal_lm(commonsense_dir: Path, tmp_path: Path) -> None:
    cfg = compose(["model=tiny-causal", "method=head_only", "task=piqa", "trainer=fast", "logger=none", f"data.dir={commonsense_dir}"])
    with pytest.raises(ValueError, match="has none"):
        run(cfg, tmp_path / "run")


def test_zero_shot_on_a_causal_lm_scores_without_a_training_split(commonsense_dir: Path, tmp_path: Path) -> None:
    (commonsense_dir / "ARC-Easy" / "train.json").unlink()  # zero-shot reads no training split
    cfg = compose(["model=tiny-causal", "method=zero_shot", "task=arc_easy", "trainer=fast", "logger=none", f"data.dir={commonsense_dir}"])
    results = json.loads(run(cfg, tmp_path / "run").read_text())
    assert (results["status"], results["steps"], results["eval_samples"]) == ("completed", 0, 6)
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0
