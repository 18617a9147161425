"""TASO's options. Every reading of a detail the paper leaves open is an option here, with the
default chosen by measurement (docs/taso_ablation_full.md: per_matrix and lr_gamma=0.5
beat global and gamma 0 / 1 on RTE+MRPC, 3 seeds) and justified in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from experiments.methods import MethodConfig, option_enum

ImportanceSource = option_enum("ImportanceSource", __name__, "grad_x_weight", "grad", "weight", "random")
Scope = option_enum("Scope", __name__, "per_matrix", "global")
Granularity = option_enum("Granularity", __name__, "rows+cols", "rows", "cols")


@dataclass
class TasoConfig(MethodConfig):
    lr: float = 5e-4  # base rate, LoRA's; adapter parameters get lr * (1/rho)^lr_gamma
    rank: Optional[int] = None  # R inside the core block; None: 8 * budget rank (rho = 1/8)
    alpha: Optional[float] = None  # None: 2 * R, LoRA's convention in this harness
    importance: ImportanceSource = ImportanceSource.grad_x_weight  # I = |theta * dL/dtheta| (paper); grad | weight | random
    importance_batches: int = 16  # training batches the importance is accumulated over: the
    # fewest that keep >= 90% of the 32-batch core rows and columns on RTE (analysis.importance_overlap)
    scope: Scope = Scope.per_matrix  # per_matrix | global
    granularity: Granularity = Granularity["rows+cols"]  # which side(s) importance selects; the other is random
    lr_gamma: float = 0.5  # sparsity-aware LR scaling exponent; 0 turns it off
    save_importance: bool = False  # also store the full importance matrices (large)
