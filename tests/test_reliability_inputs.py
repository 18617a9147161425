"""Bad options and bad input files fail up front, naming the key or the file (issue cases 2, 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

import experiments.runner as runner_module
from conftest import write_glue_task
from experiments.config import ConfigError, compose
from experiments.data import DataError, load_split
from experiments.runner import run


@pytest.mark.parametrize(
    "override,valid",
    [
        ("model.kind=causal", "encoder, causal_lm"),
        ("task.metric=acuracy", "accuracy, f1, matthews_correlation, pearson"),
        ("task.task_type=mc", "seq_cls, multiple_choice"),
        ("trainer.eval_strategy=epochs", "epoch, steps, no"),
        ("trainer.save_strategy=always", "epoch, steps, no"),
        ("trainer.lr_scheduler=cosin", "linear, cosine"),
        ("logger.name=tensorboard", "wandb, none"),
        ("logger.mode=offlin", "offline, online, disabled"),
        ("model.source=disk", "hub, package, cache, random"),
    ],
)
def test_enumerated_option_outside_its_values_fails_at_composition(override: str, valid: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    message = str(info.value.__cause__)
    key, value = override.split("=")
    assert f"Invalid value '{value}'" in message and valid in message and f"full_key: {key}" in message


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["trainer.epochs=0"], "trainer.epochs=0.0 and trainer.max_steps=-1: one of them must be > 0"),
        (["trainer.lr=0"], "trainer.lr=0.0: must be > 0"),
        (["trainer.lr=-1e-3"], "trainer.lr=-0.001: must be > 0"),
        (["trainer.batch_size=0"], "trainer.batch_size=0: must be >= 1"),
        (["trainer.eval_batch_size=0"], "trainer.eval_batch_size=0: must be >= 1"),
        (["trainer.gradient_accumulation_steps=0"], "trainer.gradient_accumulation_steps=0: must be >= 1"),
        (["trainer.warmup_ratio=1.0"], "trainer.warmup_ratio=1.0: must be in [0, 1)"),
        (["trainer.logging_steps=0"], "trainer.logging_steps=0: must be >= 1"),
        (["trainer.max_steps=-5"], "trainer.max_steps=-5: must be >= -1"),
        (["task.max_length=0"], "task.max_length=0: must be >= 1"),
        (["task.max_train_samples=0"], "task.max_train_samples=0: must be >= 1"),
        (["method.lr=-1"], "method.lr=-1.0: must be > 0"),
        (["seed=-1"], "seed=-1: must be >= 0"),
    ],
)
def test_value_outside_its_range_fails_at_composition(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert expected in str(info.value)


def test_epochs_zero_is_fine_with_max_steps() -> None:
    assert compose(["trainer.epochs=0", "trainer.max_steps=3"]).trainer.max_steps == 3


def test_run_checks_the_config_before_loading_anything(make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config edited after composition (a notebook) is checked again by run()."""
    cfg = make_cfg("method=lora")
    cfg.trainer.lr = -1e-3
    loaded = []
    monkeypatch.setattr(runner_module, "load_tokenizer", lambda *a, **k: loaded.append(a))
    with pytest.raises(ConfigError, match=r"trainer.lr=-0.001: must be > 0"):
        run(cfg, tmp_path / "bad")
    assert not loaded and not (tmp_path / "bad").exists()


@pytest.mark.slow  # a run.py process (~10 s, its imports); the refusal is unit-tested in-process above
def test_cli_refuses_an_unknown_model_kind_before_loading(cli, tmp_path: Path) -> None:
    out = cli("model=tiny", "logger=none", "model.kind=causal", f"paths.runs={tmp_path / 'runs'}", cwd=tmp_path)
    assert out.returncode != 0
    assert "Invalid value 'causal', expected one of [encoder, causal_lm]" in out.stderr and "model.kind" in out.stderr
    assert not (tmp_path / "runs").exists()


# --- data files: every read error names the file (and line) ------------------------------------


def rte_task():  # noqa: ANN201
    return compose(["task=rte"]).task


def test_header_only_tsv_names_the_file(tmp_path: Path) -> None:
    folder = write_glue_task(tmp_path, "RTE")
    (folder / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{folder / 'train.tsv'}: no data rows after the header"):
        load_split(rte_task(), "train", str(tmp_path))


def test_non_utf8_tsv_names_file_and_line(tmp_path: Path) -> None:
    folder = write_glue_task(tmp_path, "RTE")
    lines = (folder / "train.tsv").read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"cat", b"caf\xe9")  # Latin-1 in line 3
    (folder / "train.tsv").write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=rf"{folder / 'train.tsv'}:3: not UTF-8 text"):
        load_split(rte_task(), "train", str(tmp_path))


def test_half_written_commonsense_json_names_file_and_line(tmp_path: Path) -> None:
    folder = tmp_path / "piqa"
    folder.mkdir()
    items = [{"instruction": f"Please choose: q{i} Solution1: a Solution2: b Answer format: solution1/solution2", "input": "", "output": "", "answer": "solution1"} for i in range(5)]
    text = json.dumps(items, indent=1)
    (folder / "train.json").write_text(text[: len(text) // 2], encoding="utf-8")
    task = compose(["task=piqa"]).task
    with pytest.raises(DataError, match=rf"{folder / 'train.json'}:\d+: not complete JSON"):
        load_split(task, "train", str(tmp_path))


# --- method checks that need the model's shapes: before any training step ----------------------


def test_taso_block_rank_above_a_matrix_side_is_refused_before_training(make_cfg, tmp_path: Path) -> None:
    """r16 on model=tiny: R = 128 on 32-wide matrices, a 4x4 core block for a budget rank of 16."""
    with pytest.raises(ValueError, match=r"block rank R=128 \(method.rank, default 8 x budget.rank=16\) exceeds .* \(32\)") as info:
        run(make_cfg("method=taso", "budget=r16"), tmp_path / "taso")
    assert "Lower budget.rank or set method.rank <= 32" in str(info.value)
    assert json.loads((tmp_path / "taso" / "results.json").read_text())["status"] == "failed"


def test_losia_budget_above_the_target_entries_is_refused_before_training(make_cfg, tmp_path: Path) -> None:
    """budget.rank=32 on model=tiny asks for more subnet entries than the matrices hold (was: topk's
    'selected index k out of range' after the importance pass)."""
    with pytest.raises(ValueError, match=r"budget of 28672 parameters \(budget.rank\) exceeds the 16384 entries .*model.target_modules"):
        run(make_cfg("method=losia", "budget.rank=32"), tmp_path / "losia")
