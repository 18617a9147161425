"""AdaLoRA, SoRA and BitFit on model=tiny: the allocator, the proximal step, pruning, runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from baselines.adalora.method import AdaLora
from baselines.sora.layer import GatedLoraLinear
from baselines.rank_pattern import effective_params
from baselines.sora.method import Sora, proximal_map
from conftest import slow_except
from experiments.data import load_split, tokenize
from experiments.methods import PrepareContext, build_method
from experiments.models import load_model, load_tokenizer
from experiments.runner import prepare_context, run, run_stages
from experiments.training import StepTimer, build_trainer, planned_optimizer_steps

# model=tiny: hidden 32, FFN 64, 2 layers, 6 target matrices per layer (tests/test_runs.py)
TINY_MATRICES = 12


def tiny_shape(name: str) -> tuple[int, int]:
    """(d_in, d_out) of a tiny target matrix from its name."""
    if name.endswith("intermediate.dense"):
        return 32, 64
    if name.endswith(".output.dense") and "attention" not in name:
        return 64, 32
    return 32, 32


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def prepared(cfg):  # noqa: ANN001, ANN201
    """The method, its prepared tiny model, the tokenizer and the tiny RTE training set."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.model)
    train = tokenize(load_split(cfg.task, cfg.task.train_split, cfg.data.dir), cfg.task, tokenizer)
    model = load_model(cfg.model, num_labels=2)
    method = build_method(cfg.method)
    return method, method.prepare(model, prepare_context(cfg, model, train, tokenizer)), tokenizer, train


# --- the step count the schedules use -------------------------------------------------------


def test_planned_steps_and_missing_total_steps(make_cfg) -> None:
    cfg = make_cfg("trainer.max_steps=-1", "trainer.epochs=2.5", "trainer.batch_size=32", "trainer.gradient_accumulation_steps=3")
    assert planned_optimizer_steps(cfg, 2490) == 65  # ceil(ceil(2490 / 32) / 3) = 26 per epoch
    assert planned_optimizer_steps(make_cfg("trainer.max_steps=7"), 2490) == 7
    ctx = PrepareContext(list(cfg.model.target_modules), ["classifier"], 1, 896, lambda: iter(()), "seq_cls", 0)
    for name in ("adalora", "sora"):
        with pytest.raises(ValueError, match=f"method '{name}' schedules over the run's optimizer steps"):
            build_method(make_cfg(f"method={name}").method).prepare(load_model(cfg.model, 2), ctx)


# --- AdaLoRA --------------------------------------------------------------------------------


class KeptTriplets:
    """Per optimizer step, after AdaLoRA's allocation: nonzero singular values λ in the model,
    and peft's rank pattern."""

    def __init__(self) -> None:
        self.kept: dict[int, int] = {}
        self.patterns: dict[int, dict | None] = {}

    def record(self, method: AdaLora, step: int) -> None:
        lambdas = [p for n, p in method.model.named_parameters() if "lora_E" in n]
        self.kept[step] = sum(int(p.count_nonzero()) for p in lambdas)
        pattern = method.model.peft_config["default"].rank_pattern
        self.patterns[step] = None if pattern is None else {k: list(v) for k, v in pattern.items()}


@pytest.mark.slow
def test_adalora_allocates_over_the_real_step_count(make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 24 examples, batch 4: 6 batches an epoch, accumulation 2: 3 steps an epoch, 4 epochs: T = 12
    cfg = make_cfg(
        "method=adalora", "trainer.max_steps=-1", "trainer.epochs=4", "trainer.batch_size=4", "trainer.gradient_accumulation_steps=2",
        "trainer.warmup_ratio=0",
    )
    recorder = KeptTriplets()
    original = AdaLora.after_optimizer_step

    def recording(self: AdaLora, step: int, optimizer: torch.optim.Optimizer) -> None:
        original(self, step, optimizer)
        recorder.record(self, step)

    monkeypatch.setattr(AdaLora, "after_optimizer_step", recording)
    results = read(run(cfg, tmp_path / "adalora"))
    schedule = results["adalora"]
    assert results["steps"] == schedule["total_step"] == 12
    assert (schedule["init_r"], schedule["target_r"], schedule["tinit"], schedule["tfinal"]) == (2, 1, 2, 5)

    kept, patterns = recorder.kept, recorder.patterns
    init_budget, final_budget, freeze = 2 * TINY_MATRICES, TINY_MATRICES, 12 - 5
    assert kept[1] == kept[2] == init_budget and patterns[2] is None  # t <= tinit: every triplet, no allocation yet
    shrinking = [kept[t] for t in range(2, freeze + 1)]
    assert shrinking == sorted(shrinking, reverse=True) and final_budget < kept[3] < init_budget  # the cubic schedule
    assert all(kept[t] == final_budget for t in range(freeze, 13))
    assert all(patterns[t] == patterns[freeze] for t in range(freeze, 13))  # frozen after T - tfinal

    ranks = read(tmp_path / "adalora" / "rank_pattern.json")["ranks"]
    assert len(ranks) == TINY_MATRICES and sum(ranks.values()) == final_budget
    assert len(set(ranks.values())) > 1  # re-allocated, not uniform
    assert results["effective_params"] == sum(r * (sum(tiny_shape(n)) + 1) for n, r in ranks.items())
    assert (tmp_path / "adalora" / "adapter" / "adapter_config.json").is_file()


def test_adalora_orthogonality_term_is_in_the_trainer_loss(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("method=adalora")
    method, model, tokenizer, train = prepared(cfg)
    trainer = build_trainer(cfg, method, model, train, None, tokenizer, tmp_path / "out", StepTimer())
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()  # the same dropout (none) in both forwards
    with torch.no_grad():
        trainer_loss = trainer.compute_loss(model, dict(batch))
        task_loss = model.base_model.model(**batch).loss  # bypasses AdaLoraModel.forward; λ = 0 at init
    factors = [(n, p) for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    eye = torch.eye(2)
    penalty = sum(torch.linalg.norm((p @ p.T if "lora_A" in n else p.T @ p) - eye) for n, p in factors) / len(factors)
    assert penalty > 0
    torch.testing.assert_close(trainer_loss - task_loss, 0.1 * penalty)


# --- SoRA -----------------------------------------------------------------------------------


def test_proximal_maps_zero_below_threshold_and_shift_the_rest_exactly() -> None:
    z = torch.tensor([0.125, -0.25, 0.375, -0.5, 0.75, -1.0, 0.0, 3.0])
    # official: |z| < 2ξ -> 0, else z - sign(z) ξ; soft: |z| <= ξ -> 0, else z - sign(z) ξ
    assert torch.equal(proximal_map(z, 0.25, "official"), torch.tensor([0, 0, 0, -0.25, 0.5, -0.75, 0, 2.75]))
    assert torch.equal(proximal_map(z, 0.25, "soft"), torch.tensor([0, 0, 0.125, -0.25, 0.5, -0.75, 0, 2.75]))
    assert torch.equal(proximal_map(z, 0.0, "official"), z)


def test_sora_gate_step_touches_only_the_gates(make_cfg) -> None:
    cfg = make_cfg("method=sora", "budget=r4", "method.threshold=0.25")
    method, model, _, _ = prepared(cfg)
    assert isinstance(method, Sora)
    values = torch.tensor([0.125, -0.375, 0.5, -2.0])  # official map, ξ = 0.25: 0, 0, 0.25, -1.75
    with torch.no_grad():
        for gate in method.gates():
            gate.copy_(values)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None  # Adam's step is then exactly zero
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(".gate")}
    method.gate_step(step=1, main_group={"lr": 1e-3, "initial_lr": 1e-3})
    assert all(torch.equal(g, torch.tensor([0.0, 0.0, 0.25, -1.75])) for g in method.gates())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert {id(p) for group in method.param_groups(model, 1e-3, 0.1) for p in group["params"]}.isdisjoint(
        {id(g) for g in method.gates()}
    )


def test_sora_l1_term_is_in_the_training_loss_only(make_cfg) -> None:
    method, model, tokenizer, _ = prepared(make_cfg("method=sora", "budget=r2"))
    inputs = {**tokenizer(["A cat.", "Markets rose."], padding=True, return_tensors="pt"), "labels": torch.tensor([0, 1])}
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # training and evaluation mode then compute the same task loss
    with torch.no_grad():
        eval_loss = model.eval()(**inputs).loss
        train_loss = model.train()(**inputs).loss
    gates = torch.cat(method.gates())
    torch.testing.assert_close(train_loss - eval_loss, 10.0 * gates.abs().sum() / gates.numel())  # η = 10


def test_pruned_sora_adapter_gives_the_gated_outputs(make_cfg) -> None:
    cfg = make_cfg("method=sora", "budget=r4")
    method, model, tokenizer, _ = prepared(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for i, layer in enumerate(method.layers.values()):
            layer.lora_B.normal_()
            layer.gate[torch.arange(4) % 3 == i % 3] = 0.0  # a few ranks off in every layer
        next(iter(method.layers.values())).gate.zero_()  # and one layer off entirely
    expected = {n: int(layer.gate.count_nonzero()) for n, layer in method.layers.items()}
    inputs = tokenizer(["A man is playing a guitar.", "Stocks fell sharply."], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        gated = model(**inputs).logits
        method.prune()
        pruned = model(**inputs).logits
    assert {n: layer.rank for n, layer in method.layers.items()} == expected and 0 in expected.values()
    assert all(isinstance(m, GatedLoraLinear) for m in method.layers.values())
    torch.testing.assert_close(pruned, gated)


def test_sora_run_prunes_and_records_effective_params(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("method=sora", "budget=r4", "trainer.max_steps=6", "method.threshold=0.4", "method.threshold_schedule=staged",
                   "method.threshold_stages=3")
    results = read(run(cfg, tmp_path / "sora"))
    ranks = read(tmp_path / "sora" / "rank_pattern.json")["ranks"]
    assert results["sora"]["r_max"] == 4 and sum(ranks.values()) < 4 * TINY_MATRICES  # some ranks pruned
    assert results["effective_params"] == effective_params(ranks, {n: tiny_shape(n) for n in ranks})
    assert results["effective_params"] < results["trainable_params"]  # counted before pruning
    adapter = load_file(str(tmp_path / "sora" / "adapter.safetensors"))
    assert all(adapter[f"{n}.gate"].numel() == r and adapter[f"{n}.lora_A"].shape[0] == r for n, r in ranks.items())


# --- BitFit and the three methods end to end ------------------------------------------------


def test_bitfit_leaves_every_weight_bit_for_bit(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("method=bitfit", "trainer.max_steps=3")
    torch.manual_seed(0)
    model = load_model(cfg.model, 2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("bias") and "classifier" not in n}
    results = read(run_stages(cfg, tmp_path / "bitfit", model=model))
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") and "classifier" not in n)
    assert results["effective_params"] == results["trainable_params"] == biases


@pytest.mark.parametrize("method", slow_except(["adalora", "bitfit", "sora"], {"adalora", "sora"}))
def test_runs_end_to_end_with_effective_params(make_cfg, tmp_path: Path, method: str) -> None:
    results = read(run(make_cfg(f"method={method}"), tmp_path / method))
    assert results["status"] == "completed" and results["steps"] == 4
    assert isinstance(results["effective_params"], int) and results["effective_params"] > 0
    assert 0.0 <= results["metrics"]["main"] <= 1.0
