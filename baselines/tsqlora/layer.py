"""Per-matrix LoRA ranks that move during training under a fixed parameter count (TsqLoRA's
dynamic rank allocation, docs/papers.md 3.1 (6)).

The target matrices are grouped by shape; a group of n matrices owns a pool of U = K n
rank-one units (rows of A, U x d_in, and columns of B, d_out x U), so the pools hold exactly
the LoRA rank-K count K sum_m (d_in + d_out) whatever the allocation. Matrix m uses the
units it owns, U_m, |U_m| = r_m:

    y = W x + b + s B[:, U_m] A[U_m, :] x          (LoRA, Hu et al. 2021, with rank r_m)

Moving a unit from matrix a to matrix b first folds its update s B[:, u] A[u, :] into W_a
(nothing learned is lost; the function is unchanged), then re-initialises it LoRA's way for
b (A row Kaiming-uniform, B column 0, so b's function is unchanged too) and zeroes its AdamW
moments. A matrix gives up its units of smallest ||B[:, u]|| ||A[u, :]|| first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from experiments.adaptation import MethodLayer


class RankPool(MethodLayer):
    """The rank-one units shared by the matrices of one shape."""

    def __init__(self, units: int, d_out: int, d_in: int, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)), LoRA's A initialisation
        self.lora_A = nn.Parameter((torch.rand(units, d_in, generator=generator) * 2 - 1).mul_(bound).to(device, dtype))
        self.lora_B = nn.Parameter(torch.zeros(d_out, units, device=device, dtype=dtype))
        self.layers: list[PooledLoraLinear] = []

    @property
    def size(self) -> int:
        return self.lora_A.shape[0]

    @torch.no_grad()
    def reassign(self, ranks: list[int], optimizer: torch.optim.Optimizer | None, generator: torch.Generator) -> int:
        """Give layer i of the pool ``ranks[i]`` units (sum = pool size); return units moved."""
        if sum(ranks) != self.size or len(ranks) != len(self.layers):
            raise ValueError(f"ranks {ranks} do not share the pool's {self.size} units among {len(self.layers)} matrices")
        strength = self.lora_B.norm(dim=0) * self.lora_A.norm(dim=1)
        free: list[int] = []
        for layer, rank in zip(self.layers, ranks):
            units = layer.units.tolist()
            if len(units) > rank:
                weakest_first = sorted(units, key=lambda u: float(strength[u]))
                dropped = weakest_first[: len(units) - rank]
                layer.fold(dropped)
                layer.units = torch.tensor(sorted(set(units) - set(dropped)), dtype=torch.long, device=layer.units.device)
                free += dropped
        moved = len(free)
        for layer, rank in zip(self.layers, ranks):
            missing = rank - len(layer.units)
            if missing > 0:
                taken, free = free[:missing], free[missing:]
                self._reset(taken, optimizer, generator)
                layer.units = torch.tensor(sorted(layer.units.tolist() + taken), dtype=torch.long, device=layer.units.device)
        return moved

    def _reset(self, units: list[int], optimizer: torch.optim.Optimizer | None, generator: torch.Generator) -> None:
        index = torch.tensor(units, dtype=torch.long, device=self.lora_A.device)
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])
        fresh = (torch.rand(len(units), self.lora_A.shape[1], generator=generator) * 2 - 1) * bound
        self.lora_A[index] = fresh.to(self.lora_A.device, self.lora_A.dtype)
        self.lora_B[:, index] = 0
        state = optimizer.state if optimizer is not None else {}
        for param, rows in ((self.lora_A, True), (self.lora_B, False)):
            for key in ("exp_avg", "exp_avg_sq"):
                moment = state.get(param, {}).get(key)
                if moment is not None and rows:
                    moment[index.to(moment.device)] = 0
                elif moment is not None:
                    moment[:, index.to(moment.device)] = 0


class PooledLoraLinear(MethodLayer):
    """A frozen ``nn.Linear`` plus the LoRA units of its pool that it currently owns."""

    def __init__(self, base: nn.Linear, pool: RankPool, units: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.__dict__["pool"] = pool  # shared, registered once on the model (not per layer)
        # not persistent: its size changes with the allocation, which loading a state dict into a
        # fresh layer could not follow; it travels in the method's state (TsqLora.state_dict)
        self.register_buffer("units", units.to(device=base.weight.device, dtype=torch.long), persistent=False)
        self.scaling = scaling
        pool.layers.append(self)

    @property
    def rank(self) -> int:
        return len(self.units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.rank:
            return y
        a = self.pool.lora_A.index_select(0, self.units)
        b = self.pool.lora_B.index_select(1, self.units)
        # out of place: y is a view of the frozen layer's output (F.linear of a 3-D input), and an
        # in-place add on a view makes autograd copy the whole output again in backward (CopySlices)
        return torch.add(y, F.linear(F.linear(x, a), b), alpha=self.scaling)

    @torch.no_grad()
    def fold(self, units: list[int]) -> None:
        """Add the update of ``units``, s B[:, U] A[U, :], into the frozen weight."""
        index = torch.tensor(units, dtype=torch.long, device=self.units.device)
        delta = self.pool.lora_B[:, index] @ self.pool.lora_A[index]
        self.base.weight.add_(delta.to(self.base.weight.dtype), alpha=self.scaling)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}"
