"""LoSiA, LoSiA-Pro and TsqLoRA on model=tiny: subnet-only updates, the re-localisation
schedule, Pro's equal updates, quality sampling, rank allocation and end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from experiments.runner import run_stages
from baselines.losia.method import Losia
from baselines.tsqlora.layer import PooledLoraLinear, RankPool
from baselines.losia.layer import SubnetLinear, subnet_shapes
from baselines.tsqlora.sampling import sample_by_quality
from experiments.budget import allocate_ranks
from experiments.methods import build_method
from experiments.models import load_model

TINY_BUDGET_R1 = 2 * 448  # tests/test_runs.py: sum of (d_in + d_out) on model=tiny


def train(make_cfg, run_dir: Path, state: dict | None, *overrides: str) -> tuple[nn.Module, Any, dict]:
    """One run through experiments.runner.run_stages on a model that starts from ``state`` (a fresh
    random model when None); return the trained model, the method object and results.json."""
    cfg = make_cfg(*overrides)
    torch.manual_seed(0)
    model = load_model(cfg.model, 2)
    if state is not None:
        model.load_state_dict(state)
    method = build_method(cfg.method)
    results = json.loads(run_stages(cfg, run_dir, model=model, method=method).read_text())
    assert results["status"] == "completed"
    return model, method, results


def weights(method: Losia, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the model, with each managed weight as it computes."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, layer in method.layers.items():
        out[f"{name}.base.weight"] = layer.effective_weight()
    return out


def test_rank_factor_matches_the_budget() -> None:
    minilm = {f"{i}.{m}": s for i in range(6) for m, s in
              {"q": (384, 384), "k": (384, 384), "v": (384, 384), "o": (384, 384), "ffn_in": (1536, 384), "ffn_out": (384, 1536)}.items()}
    p, sides = subnet_shapes(minilm, 41_472)  # MiniLM at r1
    assert p == pytest.approx(1 / 16) and sides["0.q"] == (24, 24) and sides["0.ffn_in"] == (96, 24)
    assert sum(r * c for r, c in sides.values()) == 41_472


def test_relocalization_follows_the_gradient() -> None:
    base = nn.Linear(8, 6)
    layer = SubnetLinear(base, torch.tensor([0, 1]), torch.tensor([0, 1, 2]), "param_mix", (0.85, 0.85))
    before = layer.effective_weight()
    assert not layer.relocalize()  # nothing recorded: the subnet stays
    layer.recording = True
    for rows, cols in (([1, 4], [0, 5, 7]), ([2, 3], [1, 4, 6])):
        grad = torch.full((6, 8), 1e-3)
        grad[torch.tensor(rows).unsqueeze(1), torch.tensor(cols)] = 1.0
        layer.observe(grad * torch.linspace(1, 2, 6).unsqueeze(1) / before)  # varying |W ⊙ G|: non-zero uncertainty
        layer.observe(grad / before)
        assert layer.relocalize()
        assert layer.rows.tolist() == rows and layer.cols.tolist() == cols
        assert torch.equal(layer.effective_weight(), before)  # moving the subnet changes no weight
        assert torch.equal(layer.block, before[layer.rows][:, layer.cols])


def test_losia_updates_only_its_subnets_and_relocalizes_on_schedule(make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: dict[str, torch.Tensor] = {}  # per managed weight: every element a block ever held
    first: dict[str, tuple[list[int], list[int]]] = {}  # per managed weight: its initial subnet
    original = SubnetLinear.relocalize

    def recording_relocalize(self: SubnetLinear) -> bool:
        first.setdefault(str(id(self)), (self.rows.tolist(), self.cols.tolist()))
        mask = trained.setdefault(str(id(self)), torch.zeros_like(self.base.weight, dtype=torch.bool))
        mask[self.rows.unsqueeze(1), self.cols] = True
        return original(self)

    monkeypatch.setattr(SubnetLinear, "relocalize", recording_relocalize)
    torch.manual_seed(0)
    state = load_model(make_cfg().model, 2).state_dict()
    before = {k: v.clone() for k, v in state.items()}
    model, method, results = train(make_cfg, tmp_path / "losia", state, "method=losia", "method.period=2", "method.importance_batches=2", "trainer.max_steps=6")

    assert abs(results["trainable_params"] - TINY_BUDGET_R1) <= 0.01 * TINY_BUDGET_R1
    assert method.relocalizations == [(2, 0), (4, 1), (6, 0)]  # slot (s // T) mod N, at the end of each slot
    after = weights(method, model)
    for key, value in before.items():
        name = key.removesuffix(".base.weight").removesuffix(".weight")
        if name in method.layers:
            layer = method.layers[name]
            mask = trained[str(id(layer))].clone()
            mask[layer.rows.unsqueeze(1), layer.cols] = True
            changed = after[f"{name}.base.weight"] != value
            assert changed.any() and not (changed & ~mask).any(), name  # only subnet entries moved
        elif not key.startswith("classifier"):
            head, _, leaf = key.rpartition(".")
            assert torch.equal(after[key if key in after else f"{head}.base.{leaf}"], value), key
    moved = [n for n, layer in method.layers.items() if first[str(id(layer))] != (layer.rows.tolist(), layer.cols.tolist())]
    assert moved  # the re-selected subnets follow the recorded gradients, not the initial ones


@pytest.mark.slow
def test_losia_pro_matches_losia(make_cfg, tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = load_model(make_cfg().model, 2).state_dict()
    runs = {}
    for name in ("losia", "losia_pro"):
        model, method, _ = train(make_cfg, tmp_path / name, state, f"method={name}", "method.period=2", "method.importance_batches=2", "trainer.max_steps=5")
        runs[name] = (weights(method, model), method)
    (slow, losia), (fast, pro) = runs["losia"], runs["losia_pro"]
    assert losia.relocalizations == pro.relocalizations == [(2, 0), (4, 1)]
    for n in losia.layers:
        assert torch.equal(losia.layers[n].rows, pro.layers[n].rows) and torch.equal(losia.layers[n].cols, pro.layers[n].cols)
    assert all(not torch.equal(slow[f"{n}.base.weight"], state[f"{n}.weight"]) for n in losia.layers)
    for key, value in slow.items():
        torch.testing.assert_close(fast[key], value, atol=1e-5, rtol=0, msg=key)
    pro.begin_step(0)  # Pro forms full gradients for the recording slot only
    assert {pro.slots[n] for n, layer in pro.layers.items() if layer.full_gradient} == {0}
    assert all(layer.full_gradient for layer in losia.layers.values())


def test_quality_sampling_keeps_the_fraction_and_prefers_quality() -> None:
    scores = torch.cat([torch.full((50,), 3.0), torch.full((50,), -3.0)])[torch.randperm(100, generator=torch.Generator().manual_seed(1))]
    top = sample_by_quality(scores, 0.5, 0.0, seed=0)
    assert len(top) == 50 and bool((scores[top] == 3.0).all())
    drawn = sample_by_quality(scores, 0.7, 1.0, seed=0)
    assert len(drawn) == 70 and int((scores[drawn] == 3.0).sum()) == 50  # all high-Q ones, then low-Q
    kept = sample_by_quality(scores, 0.3, 1.0, seed=0)
    assert len(kept) == 30 and int((scores[kept] == 3.0).sum()) >= 28


def test_allocate_ranks_is_proportional_and_exact() -> None:
    assert allocate_ranks([3.0, 1.0, 0.0, 4.0], 8) == [3, 1, 0, 4]
    assert allocate_ranks([0.0, 0.0, 0.0], 4) == [2, 1, 1]
    gen = torch.Generator().manual_seed(0)
    for total in (6, 24, 37):
        scores = torch.rand(6, generator=gen).tolist()
        ranks = allocate_ranks(scores, total, min_rank=1)
        assert sum(ranks) == total and min(ranks) >= 1
        assert ranks[scores.index(max(scores))] == max(ranks)
    with pytest.raises(ValueError):
        allocate_ranks([1.0, 1.0], 1, min_rank=1)


def test_moving_rank_units_keeps_the_function() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    pool = RankPool(4, 6, 5, torch.device("cpu"), torch.float32, gen)
    layers = [PooledLoraLinear(nn.Linear(5, 6), pool, torch.tensor(u), 2.0) for u in ([0, 1], [2, 3])]
    with torch.no_grad():
        pool.lora_B.normal_()
    x = torch.randn(3, 5)
    outputs = [layer(x) for layer in layers]
    assert pool.reassign([3, 1], None, gen) == 1
    assert [layer.rank for layer in layers] == [3, 1]
    for layer, y in zip(layers, outputs):
        torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=0)


def test_tsqlora_runs_with_exact_budget_and_reallocates(make_cfg, tmp_path: Path) -> None:
    _, method, results = train(make_cfg, tmp_path / "tsq", None, "method=tsqlora", "method.realloc_every=2", "trainer.max_steps=4")
    assert results["trainable_params"] == results["budget_params"] == TINY_BUDGET_R1
    assert results["train_samples"] == round(0.7 * 24)
    assert results["tsqlora"]["reallocations"] == 3  # initial + steps 2 and 4
    for pool in method.pools.values():
        assert sum(layer.rank for layer in pool.layers) == pool.size
    assert len(set(method.ranks().values())) > 1  # ranks follow the sensitivities
