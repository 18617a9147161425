"""The cheaper per-step paths of AdaLoRA, LoSiA, TsqLoRA and full fine-tuning compute what the
plain ones did: each is checked against the unoptimised formula (peft's own code where the
method is peft's), bit for bit where the operations are the same, to float tolerance where
they are reordered (each test says which)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.adalora import AdaLoraModel, RankAllocator, SVDLinear
from torch import nn

from baselines.adalora.batched import BatchedAdaLoraModel, BatchedRankAllocator, ScaledSVDLinear
from baselines.losia.layer import SubnetLinear
from baselines.tsqlora.layer import PooledLoraLinear, RankPool
from experiments.methods import build_method
from experiments.models import load_model, load_tokenizer
from experiments.runner import prepare_context, run_stages

PRECISIONS = [torch.float32, torch.bfloat16]  # fp32, and bf16 autocast (float32 parameters)
FP32_TOLERANCE = dict(atol=1e-6, rtol=1e-5)  # float32 rounding of reordered products and sums
BF16_TOLERANCE = dict(atol=0.05, rtol=0.02)  # bf16 keeps 8 bits of mantissa


def autocast(dtype: torch.dtype) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16)


def forward_backward(layer_fn, x: torch.Tensor, params: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Output, input gradient and parameter gradients of ``layer_fn(x)`` under ``dtype``."""
    x = x.clone().requires_grad_()
    for p in params:
        p.grad = None
    with autocast(dtype):
        out = layer_fn(x)
    out.float().square().sum().backward()
    return [out.detach(), x.grad, *(p.grad.clone() for p in params)]


def graph_functions(t: torch.Tensor) -> set[str]:
    """The names of every autograd node that produced ``t``."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def casts_of(leaf: torch.Tensor, t: torch.Tensor) -> int:
    """How many dtype casts (``ToCopyBackward0``) of the leaf tensor ``leaf`` produced ``t``."""
    seen, stack, casts = set(), [t.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for next_node, _ in node.next_functions:
            casts += type(node).__name__ == "ToCopyBackward0" and getattr(next_node, "variable", None) is leaf
            stack.append(next_node)
    return casts


# --- TsqLoRA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_tsqlora_layer_equals_the_in_place_formula_bit_for_bit(dtype: torch.dtype) -> None:
    """The pooled layer adds its update out of place: the same values as the former in-place
    ``base(x).add_(...)``, without autograd's copy of the frozen layer's whole output."""
    torch.manual_seed(0)
    pool = RankPool(4, 16, 24, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pool.lora_B.normal_(std=0.1)
    units = torch.tensor([0, 2, 3])
    layer = PooledLoraLinear(nn.Linear(24, 16), pool, units, 2.0)
    layer.base.requires_grad_(False)

    def in_place(x: torch.Tensor) -> torch.Tensor:
        a, b = pool.lora_A.index_select(0, units), pool.lora_B.index_select(1, units)
        return layer.base(x).add_(F.linear(F.linear(x, a), b), alpha=layer.scaling)

    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    params = [pool.lora_A, pool.lora_B]
    for new, old in zip(forward_backward(layer, x, params, dtype), forward_backward(in_place, x, params, dtype)):
        assert torch.equal(new, old)
    with autocast(dtype):
        names = graph_functions(layer(x.clone().requires_grad_()))
    assert not names & {"CopySlices", "AsStridedBackward0"}


# --- AdaLoRA: peft's per-step work, batched (baselines/adalora/batched.py) -------------------



def peft_adalora(make_cfg, batched: bool):  # noqa: ANN001, ANN201
    """AdaLoRA's prepared tiny model (peft's objects, batched or not), its factors random."""
    torch.manual_seed(0)
    cfg = make_cfg("method=adalora", f"method.batched_steps={batched}")
    model = load_model(cfg.model, num_labels=2)
    method = build_method(cfg.method)
    model = method.prepare(model, replace(prepare_context(cfg, model, None, load_tokenizer(cfg.model)), total_steps=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_adalora_batched_objects_are_peft_subclasses(make_cfg) -> None:
    model = peft_adalora(make_cfg, batched=True)
    tuner = model.base_model
    assert type(tuner) is BatchedAdaLoraModel and type(tuner.rankallocator) is BatchedRankAllocator
    svd = [m for m in tuner.model.modules() if isinstance(m, SVDLinear)]
    assert svd and all(type(m) is ScaledSVDLinear for m in svd)
    plain = peft_adalora(make_cfg, batched=False).base_model
    assert type(plain) is AdaLoraModel and not any(isinstance(m, ScaledSVDLinear) for m in plain.modules())


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_adalora_scaled_layer_equals_peft_svd_linear(make_cfg, dtype: torch.dtype) -> None:
    """The factor-scaled forward against peft's ``SVDLinear.forward`` on the same layer: output,
    input and parameter gradients to float rounding; no copy of the frozen layer's output."""
    model = peft_adalora(make_cfg, batched=True)
    layer = next(m for m in model.modules() if isinstance(m, ScaledSVDLinear))
    params = [layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    ours = forward_backward(layer, x, params, dtype)
    peft = forward_backward(lambda t: SVDLinear.forward(layer, t), x, params, dtype)
    assert ours[0].dtype == peft[0].dtype
    for new, old in zip(ours, peft):
        torch.testing.assert_close(new, old, **(FP32_TOLERANCE if dtype is torch.float32 else BF16_TOLERANCE))
    with autocast(dtype):
        names = graph_functions(layer(x.clone().requires_grad_()))
    assert not names & {"CopySlices", "AsStridedBackward0"}


@pytest.mark.parametrize("dtype", PRECISIONS)
def test_adalora_batched_orthogonality_equals_peft(make_cfg, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The regulariser peft's ``AdaLoraModel.forward`` adds to the loss (the task loss stubbed to
    0) and its gradients, against the batched one."""
    model = peft_adalora(make_cfg, batched=True)
    tuner = model.base_model
    monkeypatch.setattr(tuner.model, "forward", lambda **_: SimpleNamespace(loss=torch.zeros(())))
    factors = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    results = []
    for forward in (BatchedAdaLoraModel.forward, AdaLoraModel.forward):
        for p in factors:
            p.grad = None
        with autocast(dtype):
            loss = forward(tuner).loss
        loss.backward()
        results.append([loss.detach(), *(p.grad.clone() for p in factors)])
    assert results[0][0] > 0
    for new, old in zip(*results):
        torch.testing.assert_close(new, old, **(FP32_TOLERANCE if dtype is torch.float32 else BF16_TOLERANCE))


def test_adalora_batched_sensitivities_and_masks_are_peft_bit_for_bit(make_cfg) -> None:
    """Three sensitivity updates (Ī, Ū, I) from random gradients, then the final masking, by the
    batched allocator and by peft's own methods on the same model: bit for bit."""
    model = peft_adalora(make_cfg, batched=True)
    tuner = model.base_model
    config = tuner.peft_config["default"]
    ours, peft = tuner.rankallocator, RankAllocator(tuner.model, config, "default")
    factors = [p for n, p in tuner.model.named_parameters() if "lora_" in n]
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for p in factors:
            p.grad = torch.randn(p.shape, generator=gen)
        ours.update_ipt(tuner.model)
        peft.update_ipt(tuner.model)
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        a, b = getattr(ours, key), getattr(peft, key)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), key
    lambdas = [p for n, p in tuner.model.named_parameters() if "lora_E" in n]
    start = [p.detach().clone() for p in lambdas]
    for pattern in (peft.mask_to_budget(tuner.model, 8), {k: [True, False] for k in peft.mask_to_budget(tuner.model, 8)}):
        masked = []
        for allocator in (ours, peft):
            with torch.no_grad():
                for p, value in zip(lambdas, start):
                    p.copy_(value)
            allocator.mask_using_rank_pattern(tuner.model, pattern)
            masked.append([p.detach().clone() for p in lambdas])
        assert all(torch.equal(a, b) for a, b in zip(*masked))


def test_adalora_batched_run_keeps_peft_ranks_and_weights(make_cfg, tmp_path: Path) -> None:
    """Six optimizer steps (warm-up, budget phase, frozen allocation) with the batched per-step
    work and with peft's own: the same rank pattern, the trained weights to float rounding."""
    runs = {}
    for batched in (True, False):
        cfg = make_cfg("method=adalora", f"method.batched_steps={batched}", "trainer.max_steps=6", "trainer.warmup_ratio=0")
        torch.manual_seed(0)
        model = load_model(cfg.model, num_labels=2)
        method = build_method(cfg.method)
        results = json.loads(run_stages(cfg, tmp_path / str(batched), model=model, method=method).read_text())
        assert results["status"] == "completed"
        runs[batched] = (method, {n: p.detach().clone() for n, p in model.named_parameters()})
    (ours, trained), (peft, reference) = runs[True], runs[False]
    assert (ours.peft_settings.tinit, ours.peft_settings.tfinal) == (1, 3)  # steps 2-3 allocate, 4-6 frozen
    assert ours.rank_pattern == peft.rank_pattern and ours.rank_pattern is not None
    assert trained.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, **FP32_TOLERANCE, msg=name)


# --- LoSiA: one product with the effective weight ----------------------------------------------


def subnet_layer(full_gradient: bool) -> tuple[SubnetLinear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A subnet layer with a trained-looking block, and its effective weight, rows and columns."""
    torch.manual_seed(0)
    rows, cols = torch.tensor([1, 5, 9]), torch.tensor([0, 3, 7, 20])
    layer = SubnetLinear(nn.Linear(24, 16), rows, cols, "param_mix", (0.85, 0.85))
    layer.full_gradient = full_gradient
    with torch.no_grad():
        layer.block.add_(torch.randn(layer.block.shape, generator=torch.Generator().manual_seed(2)))
    return layer, layer.effective_weight(), rows, cols


@pytest.mark.parametrize("full_gradient", [True, False])  # LoSiA's backward, LoSiA-Pro's
def test_losia_layer_is_a_dense_linear_bit_for_bit(full_gradient: bool) -> None:
    """fp32: output, input and bias gradients of a dense ``nn.Linear`` holding the effective
    weight, bit for bit; the block gradient is its weight gradient's block (bit for bit from G,
    LoSiA; to float rounding from the sliced product, LoSiA-Pro)."""
    layer, effective, rows, cols = subnet_layer(full_gradient)
    dense = nn.Linear(24, 16)
    with torch.no_grad():
        dense.weight.copy_(effective)
        dense.bias.copy_(layer.base.bias)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    out, grad_x, grad_bias, grad_block = forward_backward(layer, x, [layer.base.bias, layer.block], torch.float32)
    dense_out, dense_grad_x, dense_grad_bias, dense_grad_w = forward_backward(dense, x, [dense.bias, dense.weight], torch.float32)
    assert torch.equal(out, dense_out) and torch.equal(grad_x, dense_grad_x) and torch.equal(grad_bias, dense_grad_bias)
    block_of_dense = dense_grad_w[rows.unsqueeze(1), cols]
    if full_gradient:
        assert torch.equal(grad_block, block_of_dense)
    else:
        torch.testing.assert_close(grad_block, block_of_dense, **FP32_TOLERANCE)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("full_gradient", [True, False])
def test_losia_layer_equals_the_scattered_block_product(full_gradient: bool, dtype: torch.dtype) -> None:
    """Against the former formula, the frozen product plus the block's own product scattered
    into the rows R: the same values to float rounding (bf16: one rounding fewer)."""
    layer, _, rows, cols = subnet_layer(full_gradient)
    base = layer.base

    def scattered(x: torch.Tensor) -> torch.Tensor:
        return torch.index_add(F.linear(x, base.weight, base.bias), -1, rows, F.linear(x[..., cols], layer.block))

    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    params = [base.bias, layer.block]
    for new, old in zip(forward_backward(layer, x, params, dtype), forward_backward(scattered, x, params, dtype)):
        torch.testing.assert_close(new.float(), old.float(), **(FP32_TOLERANCE if dtype is torch.float32 else BF16_TOLERANCE))


def test_adalora_scaled_layer_keeps_a_bf16_input_in_bf16(make_cfg) -> None:
    """Under bf16 autocast a bf16 input is not cast to float32 and back (peft's cast before the
    product): output and every gradient the same bit for bit, no float32 copy in the graph."""
    model = peft_adalora(make_cfg, batched=True)
    layer = next(m for m in model.modules() if isinstance(m, ScaledSVDLinear))
    params = [layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(1)).bfloat16()
    ours = forward_backward(layer, x, params, torch.bfloat16)
    cast_first = forward_backward(lambda t: layer(t.float()), x, params, torch.bfloat16)
    assert ours[1].dtype == torch.bfloat16
    for new, old in zip(ours, cast_first):
        assert torch.equal(new, old)
    leaf = x.clone().requires_grad_()
    with autocast(torch.bfloat16):
        out = layer(leaf)
    assert out.dtype == torch.bfloat16 and not casts_of(leaf, out)
