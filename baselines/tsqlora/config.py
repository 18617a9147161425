"""TsqLoRA's options; the readings behind them: :mod:`baselines.tsqlora.method`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from experiments.methods import MethodConfig


@dataclass
class TsqLoraConfig(MethodConfig):
    lr: float = 5e-4  # LoRA's rate in this harness
    keep_fraction: float = 0.7  # ρ, share of the training set kept (our default)
    temperature: float = 1.0  # τ of p(x) ∝ exp(Q / τ); 0 keeps the top-Q examples
    alphas: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # α1 grad norm, α2 Δℓ, α3 ΔC
    eta: Optional[float] = None  # η of the hypothetical step; None: the method's lr
    scoring_batch_size: int = 32
    sensitivity_batches: int = 4  # batches behind each S_l estimate
    sensitivity_beta: float = 0.85  # EMA of S_l across re-allocations (AdaLoRA's β)
    realloc_every: int = 100  # steps between re-allocations (our default)
    min_rank: int = 0
    scaling: float = 2.0  # s in y = W x + s B A x, LoRA's alpha / r in this harness
