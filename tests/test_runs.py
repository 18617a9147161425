"""End-to-end runs on model=tiny: full and LoRA, results.json, budgets, the CLI and a sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException

from experiments.budget import count_params, lora_param_count
from experiments.config import compose
from experiments.methods import PrepareContext, build_method
from experiments.models import load_model
from experiments.runner import run, run_stages

REQUIRED = {
    "task", "method", "budget", "seed", "model", "metrics", "trainable_params", "head_params",
    "total_params", "train_time_s", "step_time_s", "peak_memory_mb", "status",
}
# model=tiny: hidden 32, FFN 64, 2 layers. Per layer q, k, v, attention-out: 4 * (32 + 32);
# FFN in and out: 2 * (32 + 64). Sum of (d_in + d_out) = 256 + 192 = 448 per layer.
TINY_SUM_DIN_DOUT = 2 * 448
TINY_HEAD = 32 * 2 + 2  # classifier of a 2-label task


def read(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_run_writes_valid_results(make_cfg, tmp_path: Path, method: str) -> None:
    cfg = make_cfg(f"method={method}")
    path = run(cfg, tmp_path / method)
    results = read(path)
    assert REQUIRED <= results.keys()
    assert results["status"] == "completed"
    assert results["steps"] == 4
    assert 0.0 <= results["metrics"]["main"] <= 1.0
    assert results["metrics"]["main"] == results["metrics"]["accuracy"]
    assert 0.5 <= results["metrics_constant"]["main"] == results["metrics_constant"]["accuracy"] <= 1.0  # the majority rate
    assert results["head_params"] == TINY_HEAD
    assert (tmp_path / method / "config.yaml").is_file()
    assert not (tmp_path / method / "checkpoints").exists()
    if method == "lora":
        assert results["trainable_params"] == TINY_SUM_DIN_DOUT
    else:
        assert results["trainable_params"] == results["total_params"] - TINY_HEAD


@pytest.mark.parametrize("rank", [1, 8])
def test_lora_count_is_analytic(make_cfg, rank: int) -> None:
    cfg = make_cfg("method=lora", f"budget=r{rank}")
    model = load_model(cfg.model, num_labels=2)
    assert lora_param_count(model, list(cfg.model.target_modules), rank) == rank * TINY_SUM_DIN_DOUT
    ctx = PrepareContext(list(cfg.model.target_modules), ["classifier"], rank, rank * TINY_SUM_DIN_DOUT, lambda: iter(()), "seq_cls", 0)
    adapted = build_method(cfg.method).prepare(model, ctx)
    counts = count_params(adapted, ["classifier"])
    assert counts["trainable_params"] == rank * TINY_SUM_DIN_DOUT
    assert counts["head_params"] == TINY_HEAD


def test_lora_trains_only_adapter_and_head(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("method=lora")
    model = load_model(cfg.model, num_labels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = PrepareContext(list(cfg.model.target_modules), ["classifier"], 1, TINY_SUM_DIN_DOUT, lambda: iter(()), "seq_cls", 0)
    adapted = build_method(cfg.method).prepare(model, ctx)
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "classifier" in n for n in names)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


def test_regression_task_runs(make_cfg, tmp_path: Path) -> None:
    results = read(run(make_cfg("method=lora", "task=stsb"), tmp_path / "stsb"))
    assert results["metric"] == "pearson" and "spearman" in results["metrics"]
    assert results["head_params"] == 32 + 1


def test_failed_run_records_the_error(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("method=lora", "task.max_length=4096")
    with pytest.raises(ValueError, match="exceeds model tiny's limit of 512"):
        run(cfg, tmp_path / "bad")
    results = read(tmp_path / "bad" / "results.json")
    assert results["status"] == "failed" and results["error_type"] == "ValueError"


def test_cli_single_run_prints_results_path(cli, glue_dir: Path, tmp_path: Path) -> None:
    out = cli("model=tiny", "trainer=fast", "logger=none", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    path = Path(out.stdout.strip().splitlines()[-1])
    assert path.name == "results.json" and path.parent.parent == tmp_path / "rte" / "tiny" / "taso-r1"  # the default method
    assert read(path)["status"] == "completed"


@pytest.mark.slow
def test_cli_sweep(cli, glue_dir: Path, tmp_path: Path) -> None:
    out = cli(
        "-m", "method=lora,full", "task=rte,mrpc", "model=tiny", "trainer=fast", "trainer.max_steps=2",
        "logger=none", f"data.dir={glue_dir}", f"paths.runs={tmp_path}", cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = sorted(p.relative_to(tmp_path).parts[:3] for p in tmp_path.rglob("results.json"))
    assert found == [
        ("mrpc", "tiny", "full-r1"), ("mrpc", "tiny", "lora-r1"), ("rte", "tiny", "full-r1"), ("rte", "tiny", "lora-r1"),
    ]


def test_an_unknown_method_is_refused_listing_the_choices() -> None:
    with pytest.raises(MissingConfigException, match="Could not find 'method/lorra'") as error:
        compose(["method=lorra"])
    assert "lora" in str(error.value) and "full" in str(error.value)


@pytest.mark.slow  # a run.py process (~10 s, its imports); the refusal is unit-tested in-process above
def test_cli_unknown_method_lists_choices(cli, tmp_path: Path) -> None:
    out = cli("method=lorra", "logger=none", cwd=tmp_path)
    assert out.returncode != 0
    assert "Could not find 'method/lorra'" in out.stderr and "lora" in out.stderr and "full" in out.stderr


def test_bitfit_changes_only_biases_and_head(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("method=bitfit", "trainer.max_steps=3")
    torch.manual_seed(0)
    model = load_model(cfg.model, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = read(run_stages(cfg, tmp_path / "bitfit", model=model))  # the run trains this model
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.endswith("bias") or k.startswith("classifier") for k in changed)
    n_bias = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") and not n.startswith("classifier"))
    assert results["trainable_params"] == n_bias and results["head_params"] == TINY_HEAD
