"""Stage 3 of TASO: LoRA restricted to a core block, around the frozen linear layer.

    y = W x + b + s * S_R B A S_C^T x          (TASO's sparse LoRA, docs/taso.md)

with S_C^T the gather of the core input columns C (A: R x |C|), S_R the scatter into the core
output rows R (B: |R| x R) and s = alpha / R. Initialisation is LoRA's: A Kaiming-uniform,
B = 0, so training starts from the pretrained function. No d_out x d_in update is ever formed;
:meth:`SparseLoraLinear.merge` folds it into W[R, C] for inference.

How a step is computed (:class:`_SparseLoraFunction`), with tokens flattened to n rows:

- forward: ``x_C = gather(x, C)`` (an index gather, never a masked product) and
  ``h = x_C A^T`` (n x R). The scatter into the core rows is fused with the frozen layer's
  bias-add: the GEMM accumulator is initialised as ``[h, 1] [s S_R B, b]^T`` (R + 1 inner
  products per output, written once, where ``F.linear`` writes the broadcast bias once), then
  ``x W^T`` is accumulated into it in place (``addmm_``). A separate ``index_add_`` would read
  and write the whole output a second time.
- backward, with g = ∂L/∂y and g_R = gather(g, R):
      ∂L/∂B = s g_R^T h,   ∂L/∂h = s g_R B,   ∂L/∂A = (∂L/∂h)^T x_C,
      ∂L/∂x = (∂L/∂h) (A S_C^T) + g W
  where the scatter of ∂L/∂h A into the core columns is likewise the initial accumulator of
  the input-gradient GEMM. The frozen weight's gradient is never formed.

The two scatters are products with the zero-padded factors S_R B (d_out x R) and A S_C^T
(R x d_in): R + 1 extra multiply-adds per output element, about R / d_in of the frozen
layer's own cost (2% for R = 8 on MiniLM), in exchange for no extra pass over the
activations. The gathers stay index gathers. Measured by ``make bench``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from experiments.adaptation import MethodLayer, autocast_off, compute_dtype, gather_columns


class _SparseLoraFunction(torch.autograd.Function):
    """Forward and backward of the sparse LoRA linear (the equations in the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, rows, cols, scaling):  # noqa: ANN001, ANN205
        dtype = compute_dtype(x, weight)
        lead = x.shape[:-1]
        with autocast_off(x):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            x_c = gather_columns(x2, cols)
            h = x_c @ a.T
            rank = a.shape[0]
            init = w.new_zeros(rank + 1, w.shape[0])  # [s S_R B, b]^T
            init[:rank, rows] = scaling * b.T
            if bias is not None:
                init[rank] = bias.to(dtype)
            y = torch.cat([h, h.new_ones(h.shape[0], 1)], 1) @ init
            y.addmm_(x2, w.T)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, w, a, b, rows, cols, x_c, h)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y.view(*lead, w.shape[0])

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        x2, w, a, b, rows, cols, x_c, h = ctx.saved_tensors
        s = ctx.scaling
        lead = grad_y.shape[:-1]
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        with autocast_off(grad_y):
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(w.dtype)
            g_rows = gather_columns(g, rows)
            grad_h = s * (g_rows @ b)
            if ctx.needs_input_grad[0]:
                a_padded = w.new_zeros(a.shape[0], w.shape[1])  # A S_C^T
                a_padded[:, cols] = a
                grad_x = (grad_h @ a_padded).addmm_(g, w).view(*lead, w.shape[1])
            if ctx.needs_input_grad[1]:
                grad_w = g.T @ x2
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = g.sum(0)
            if ctx.needs_input_grad[3]:
                grad_a = grad_h.T @ x_c
            if ctx.needs_input_grad[4]:
                grad_b = s * (g_rows.T @ h)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


class SparseLoraLinear(MethodLayer):
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
