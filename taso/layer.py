"""Stage 3 of TASO: LoRA restricted to a core block, as a gather / scatter around the frozen
linear layer.

    y = W x + b + s * S_R B A S_C^T x          (TASO's sparse LoRA, papers.md 1.4-1.5)

with S_C the selection of the core input columns C (A: R x |C|) and S_R the scatter into the
core output rows R (B: |R| x R), s = alpha / R. The forward gathers ``x[..., C]``
(``index_select``), applies the two small factors and adds into ``y[..., R]``
(``index_add_``): no d_out x d_in matrix is formed, and the backward (written out in
:class:`_SparseLoraFunction`) scatters the gathered gradient into the input gradient in place. Initialisation is LoRA's: A Kaiming-
uniform, B = 0, so training starts from the pretrained function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _SparseLoraFunction(torch.autograd.Function):
    """Forward and backward of the sparse LoRA linear in one function.

    Backward, with g = ∂L/∂y, g_R = g[..., R], x_C = x[..., C], h = x_C A^T:
        ∂L/∂B = s g_R^T h,   ∂L/∂h = s g_R B,   ∂L/∂A = (∂L/∂h)^T x_C,
        ∂L/∂x = g W, then ∂L/∂x[..., C] += (∂L/∂h) A   (added in place)
    Written by hand so that the gradient of the gather is added into the frozen layer's input
    gradient in place, instead of autograd materialising a zero-filled d_in-wide tensor per
    layer and summing it; the frozen weight's gradient is never formed.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, lora_a, lora_b, rows, cols, scaling):  # noqa: ANN001, ANN205
        x_c = x.index_select(-1, cols)
        h = F.linear(x_c, lora_a)
        y = F.linear(x, weight, bias)
        y.index_add_(-1, rows, F.linear(h, lora_b), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, rows, cols, x_c, h)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        x, weight, lora_a, lora_b, rows, cols, x_c, h = ctx.saved_tensors
        s = ctx.scaling
        grad_rows = grad_y.index_select(-1, rows)
        grad_h = s * (grad_rows @ lora_b)
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight
            grad_x.index_add_(-1, cols, grad_h @ lora_a)
        if ctx.needs_input_grad[1]:
            grad_w = grad_y.reshape(-1, grad_y.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        if ctx.needs_input_grad[3]:
            grad_a = grad_h.reshape(-1, grad_h.shape[-1]).T @ x_c.reshape(-1, x_c.shape[-1])
        if ctx.needs_input_grad[4]:
            grad_b = s * (grad_rows.reshape(-1, grad_rows.shape[-1]).T @ h.reshape(-1, h.shape[-1]))
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


class SparseLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rows: torch.Tensor, cols: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("rows", rows.to(device=base.weight.device, dtype=torch.long))
        self.register_buffer("cols", cols.to(device=base.weight.device, dtype=torch.long))
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, len(cols), **factory))
        self.lora_B = nn.Parameter(torch.zeros(len(rows), rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank = rank
        self.scaling = alpha / rank
        self._saved_block: torch.Tensor | None = None

    @property
    def merged(self) -> bool:
        return self._saved_block is not None

    def delta_block(self) -> torch.Tensor:
        """The update on the core block, s * B A (|R| x |C|)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return _SparseLoraFunction.apply(
            x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.rows, self.cols, self.scaling
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W[R, C]; inference then costs what the base layer costs."""
        if self.merged:
            return
        block = (self.rows.unsqueeze(1), self.cols.unsqueeze(0))
        weight = self.base.weight
        self._saved_block = weight[block].clone()
        weight[block] = weight[block] + self.delta_block().to(weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the pretrained block exactly (the saved values, not a subtraction)."""
        if not self.merged:
            return
        self.base.weight[self.rows.unsqueeze(1), self.cols.unsqueeze(0)] = self._saved_block
        self._saved_block = None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, rows={len(self.rows)}/{self.base.out_features}, cols={len(self.cols)}/{self.base.in_features}"
