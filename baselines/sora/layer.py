"""LoRA with a gate vector between its two projections (SoRA's module; Ding et al., EMNLP 2023):

    y = W x + b + s · B (g ⊙ (A dropout(x))),      s = alpha / r_max

with A ∈ R^{r×d_in} Kaiming-uniform, B ∈ R^{d_out×r} zeros and g ∈ R^r drawn from N(0, 1)
(the official src/lora.py), so training starts from the pretrained function. The gate scales
the r-wide hidden activation A x: no d_out × d_in matrix, dense or masked, is ever formed.

A rank whose gate is exactly zero contributes nothing, so :meth:`GatedLoraLinear.prune`
can remove its row of A, column of B and gate entry: the result is the same function with a
smaller rank. The scaling s keeps its value from the initial rank r_max (it is a constant of
the trained function, not a property of the current rank).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from experiments.adaptation import MethodLayer, replace_linears


class GatedLoraLinear(MethodLayer):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        self.gate = nn.Parameter(torch.randn(rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def rank(self) -> int:
        return self.gate.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(self.dropout(x), self.lora_A) * self.gate
        return self.base(x) + self.scaling * F.linear(hidden, self.lora_B)

    @torch.no_grad()
    def prune(self) -> int:
        """Drop the ranks whose gate is exactly zero (A, B and g shrink in place); return the
        kept rank. The layer computes the same function before and after."""
        keep = self.gate.nonzero().squeeze(1)
        for name, dim in (("lora_A", 0), ("lora_B", 1), ("gate", 0)):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(old.index_select(dim, keep).clone(), requires_grad=old.requires_grad))
        return self.rank

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def inject_gated_lora(model: nn.Module, names: list[str], rank: int, alpha: float, dropout: float) -> dict[str, GatedLoraLinear]:
    """Replace each named ``nn.Linear`` of ``model`` by a :class:`GatedLoraLinear` around it."""
    return replace_linears(model, names, lambda _name, base: GatedLoraLinear(base, rank, alpha, dropout))


def save_gated_adapter(layers: dict[str, GatedLoraLinear], path: str) -> None:
    """``<name>.lora_A``, ``<name>.lora_B``, ``<name>.gate`` per layer and each layer's scaling
    in the metadata, as safetensors (loading needs the pretrained model and this file only)."""
    tensors = {
        f"{name}.{part}": getattr(layer, part).detach().cpu().contiguous()
        for name, layer in layers.items()
        for part in ("lora_A", "lora_B", "gate")
    }
    save_file(tensors, path, metadata={f"{name}.scaling": str(layer.scaling) for name, layer in layers.items()})
