"""Stage 3 of TASO: LoRA restricted to a core block, as a gather / scatter around the frozen
linear layer.

    y = W x + b + s * S_R B A S_C^T x          (TASO's sparse LoRA, papers.md 1.4-1.5)

with S_C the selection of the core input columns C (A: R x |C|) and S_R the scatter into the
core output rows R (B: |R| x R), s = alpha / R. The forward gathers ``x[..., C]``
(``index_select``), applies the two small factors and adds into ``y[..., R]``
(``index_add_``): no d_out x d_in matrix is formed. Initialisation is LoRA's: A Kaiming-
uniform, B = 0, so training starts from the pretrained function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
        y = self.base(x)
        if self.merged:
            return y
        h = F.linear(x.index_select(-1, self.cols), self.lora_A)
        return y.index_add_(-1, self.rows, F.linear(h, self.lora_B), alpha=self.scaling)

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
