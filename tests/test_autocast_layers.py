"""Every method's own layers under bf16 autocast (CPU): the extra products run in the
autocast dtype, the parameters and their gradients stay float32, and output and gradients
match a dense nn.Linear holding the same effective weight under the same autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baselines.sora.layer import GatedLoraLinear
from baselines.tsqlora.layer import PooledLoraLinear, RankPool
from baselines.losia.layer import SubnetLinear

BF16 = dict(atol=0.1, rtol=0.03)  # bf16 keeps 8 bits of mantissa


def compare_with_dense(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward and backward of ``layer`` and of a dense layer (``weight``, ``bias``) under bf16
    autocast; asserts equal outputs and input gradients, returns the dense weight gradient."""
    dense = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(1))
    x_layer, x_dense = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, reference = layer(x_layer), dense(x_dense)
    assert out.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.float(), **BF16)
    out.float().square().sum().backward()
    reference.float().square().sum().backward()
    torch.testing.assert_close(x_layer.grad, x_dense.grad, **BF16)
    for name, p in params.items():
        assert p.dtype == p.grad.dtype == torch.float32, name
    return {"weight": dense.weight.grad, "bias": dense.bias.grad}


@pytest.mark.parametrize("full_gradient", [True, False])  # LoSiA's backward, LoSiA-Pro's
def test_losia_subnet_layer(full_gradient: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
    rows, cols = torch.tensor([1, 5, 9]), torch.tensor([0, 3, 7, 20])
    layer = SubnetLinear(base, rows, cols, "param_mix", (0.85, 0.85))
    layer.full_gradient = full_gradient
    grads = compare_with_dense(layer, weight, bias, {"block": layer.block, "bias": base.bias})
    torch.testing.assert_close(layer.block.grad, grads["weight"][rows.unsqueeze(1), cols], **BF16)
    torch.testing.assert_close(base.bias.grad, grads["bias"], **BF16)


def test_sora_gated_layer() -> None:
    torch.manual_seed(0)
    layer = GatedLoraLinear(nn.Linear(24, 16), rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    layer.base.requires_grad_(False)
    effective = layer.base.weight + layer.scaling * layer.lora_B @ torch.diag(layer.gate) @ layer.lora_A
    grads = compare_with_dense(layer, effective.detach(), layer.base.bias.detach(), {"A": layer.lora_A, "B": layer.lora_B, "gate": layer.gate})
    # dL/dB = s dL/dW (g ⊙ A)^T
    torch.testing.assert_close(layer.lora_B.grad, layer.scaling * grads["weight"] @ (layer.gate.unsqueeze(1) * layer.lora_A).T.detach(), **BF16)


def test_tsqlora_pooled_layer() -> None:
    torch.manual_seed(0)
    pool = RankPool(4, 16, 24, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pool.lora_B.normal_(std=0.1)
    units = torch.tensor([0, 2])
    layer = PooledLoraLinear(nn.Linear(24, 16), pool, units, 2.0)
    layer.base.requires_grad_(False)
    effective = layer.base.weight + 2.0 * pool.lora_B[:, units] @ pool.lora_A[units]
    grads = compare_with_dense(layer, effective.detach(), layer.base.bias.detach(), {"A": pool.lora_A, "B": pool.lora_B})
    torch.testing.assert_close(pool.lora_B.grad[:, units], 2.0 * grads["weight"] @ pool.lora_A[units].T.detach(), **BF16)
