"""A run killed after a checkpoint and resumed ends where the uninterrupted run ends: the same
model weights and buffers and the same method state (:meth:`experiments.methods.Method.state_dict`),
for every method that keeps a state of its own (docs/reliability.md, case 9a)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import set_seed

from experiments.methods import METHOD_STATE, Method, build_method
from experiments.runner import CHECKPOINTS, load_task_model, run_stages
from experiments.training import CLOCK

STEPS, CHECKPOINT_AT = 8, 4  # the run, and the checkpoint it resumes from
# options that put each method's schedule into the 8 steps, its state changing before and after
# step 4 (a rate large enough that its choices depend on what it has seen)
SCHEDULES = {
    "adalora": ("method.tfinal=0.25",),  # budget shrinks over steps 2-6 (EMAs at step 4), then the rank pattern holds
    "sora": ("method.l1_weight=0", "trainer.lr=0.05"),  # the gates' own Adam moments
    "losia": ("method.period=3",),  # slot 1 records at step 4, re-selects at step 6, re-warms after
    "losia_pro": ("method.period=3",),
    "tsqlora": ("method.realloc_every=3", "trainer.lr=0.05", "method.sensitivity_beta=0"),  # units move at steps 3 and 6
    "taso": (),  # core regions chosen once, before training
}


def trained(cfg: Any, run_dir: Path) -> tuple[Method, nn.Module, dict]:
    """One run through run_stages (resumed from run_dir's last complete checkpoint, if any):
    the method, the model it adapted (in place) and results.json."""
    set_seed(cfg.seed)
    model = load_task_model(cfg)
    method = build_method(cfg.method)
    results = json.loads(run_stages(cfg, run_dir, model=model, method=method).read_text())
    return method, model, results


def assert_same(got: Any, expected: Any, where: str) -> None:
    """Equal nested dicts / lists of tensors and plain values, every tensor bit for bit."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), f"{where}: keys {sorted(got)} != {sorted(expected)}"
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{where}[{i}]")
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_a_resumed_run_ends_as_the_uninterrupted_run(make_cfg, tmp_path: Path, name: str) -> None:
    cfg = make_cfg(  # on the CPU, whose kernels are deterministic (a GPU's atomic adds are not)
        f"method={name}", f"trainer.max_steps={STEPS}", "trainer.save_strategy=steps", f"trainer.save_steps={CHECKPOINT_AT}",
        "trainer.keep_checkpoints=true", "trainer.use_cpu=true", *SCHEDULES[name],
    )
    folder = tmp_path / "run"
    method, model, _ = trained(cfg, folder)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_state = method.state_dict()
    assert (folder / CHECKPOINTS / f"checkpoint-{CHECKPOINT_AT}" / METHOD_STATE).is_file()
    shutil.rmtree(folder / CHECKPOINTS / f"checkpoint-{STEPS}")  # as if killed after the checkpoint at step 4
    (folder / "results.json").unlink()
    clock = folder / CHECKPOINTS / f"checkpoint-{CHECKPOINT_AT}" / CLOCK
    assert json.loads(clock.read_text())["train_time_s"] > 0
    clock.write_text(json.dumps({"train_time_s": 1000.0}))  # the killed process trained 1000 s up to it
    method, model, results = trained(cfg, folder)
    assert Path(results["resumed_from"]).name == f"checkpoint-{CHECKPOINT_AT}" and results["steps"] == STEPS
    assert 1000.0 < results["train_time_s"] < 1000.0 + 600  # the whole run's time: the killed process's and this one's
    assert_same(model.state_dict(), expected, f"{name} model")
    assert_same(method.state_dict(), expected_state, f"{name} state")
    assert expected_state  # every method here keeps a state of its own


def saved_weights(folder: Path, step: int) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / CHECKPOINTS / f"checkpoint-{step}" / "model.safetensors")


def test_a_checkpoint_keeps_what_trains_and_the_buffers_the_whole_model_where_frozen_weights_change(make_cfg, tmp_path: Path) -> None:
    """TASO's checkpoint: its adapters, the head and its index buffers, no frozen weight (the
    resume test above shows the rest rebuilt); LoSiA writes into the weights it does not train
    (its subnets' holes move): the whole model."""
    steps = ("trainer.max_steps=2", "trainer.save_strategy=steps", "trainer.save_steps=2", "trainer.keep_checkpoints=true")
    _, model, _ = trained(make_cfg("method=taso", "method.importance_batches=2", *steps), tmp_path / "taso")
    saved = saved_weights(tmp_path / "taso", 2)
    trained_names = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trained_names and trained_names <= saved.keys() and not frozen_names & saved.keys()
    assert any(n.endswith(".rows") for n in saved) and any(n.endswith(".cols") for n in saved)
    _, model, _ = trained(make_cfg("method=losia", *steps), tmp_path / "losia")
    assert saved_weights(tmp_path / "losia", 2).keys() == model.state_dict().keys()


def test_a_checkpoint_without_a_trained_weight_is_not_resumed(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("method=taso", "method.importance_batches=2", "trainer.max_steps=4", "trainer.save_strategy=steps", "trainer.save_steps=2", "trainer.keep_checkpoints=true")
    folder = tmp_path / "run"
    _, model, _ = trained(cfg, folder)
    shutil.rmtree(folder / CHECKPOINTS / "checkpoint-4")
    (folder / "results.json").unlink()
    weights = folder / CHECKPOINTS / "checkpoint-2" / "model.safetensors"
    saved = safetensors.torch.load_file(weights)
    lora_a = next(n for n in saved if n.endswith("lora_A"))
    safetensors.torch.save_file({k: v for k, v in saved.items() if k != lora_a}, weights, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=f"lacks 1 of the run's trained weights \\({lora_a}\\)"):
        trained(cfg, folder)


def test_a_checkpoint_without_the_method_state_is_not_resumed(make_cfg, tmp_path: Path) -> None:
    """Killed between the Trainer's files and the method's (or written by an older version):
    incomplete, so the run starts over rather than resume without the method's state."""
    cfg = make_cfg(
        "method=losia", "trainer.max_steps=4", "trainer.save_strategy=steps", "trainer.save_steps=2", "trainer.keep_checkpoints=true"
    )
    folder = tmp_path / "run"
    trained(cfg, folder)
    for checkpoint in (folder / CHECKPOINTS).glob("checkpoint-*"):
        (checkpoint / METHOD_STATE).unlink()
    (folder / "results.json").unlink()
    _, _, results = trained(cfg, folder)
    assert results["resumed_from"] is None and results["steps"] == 4


def test_a_method_without_state_refuses_one(make_cfg) -> None:
    lora = build_method(make_cfg("method=lora").method)
    assert lora.state_dict() == {}
    lora.load_state_dict({})
    with pytest.raises(ValueError, match="method 'lora' keeps no state, but the checkpoint holds \\['records'\\]"):
        lora.load_state_dict({"records": {}})
