"""The cheaper per-step paths of AdaLoRA, LoSiA, TsqLoRA and full fine-tuning compute what the
plain ones did: each is checked against the unoptimised formula (peft's own code where the
method is peft's), bit for bit where the operations are the same, to float tolerance where
they are reordered (each test says which)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.losia.layer import SubnetLinear
from baselines.tsqlora.layer import PooledLoraLinear, RankPool

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
