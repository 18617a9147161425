"""The cheaper per-step paths of AdaLoRA, LoSiA, TsqLoRA and full fine-tuning compute what the
plain ones did: each is checked against the unoptimised formula (peft's own code where the
method is peft's), bit for bit where the operations are the same, to float tolerance where
they are reordered (each test says which)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.tsqlora.layer import PooledLoraLinear, RankPool

PRECISIONS = [torch.float32, torch.bfloat16]  # fp32, and bf16 autocast (float32 parameters)


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
