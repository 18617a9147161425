"""Stage 1 of TASO: task-specific importance of the pretrained weights.

For every targeted weight matrix W the first-order Taylor (sensitivity) score is accumulated
over ``N`` batches of the downstream task (TASO, Miao et al., EMNLP 2025, importance estimation):

    I = sum_b | W ⊙ ∂L_b/∂W |

with L_b the supervised loss of batch b on the frozen pretrained model, the sum of per-batch
absolute values (:func:`experiments.adaptation.sensitivity`).

Ablation sources (``method.importance``): ``grad`` (sum_b |∂L_b/∂W|), ``weight`` (|W|, no
data) and ``random`` (uniform scores from the run's seed).
"""

from __future__ import annotations

import torch
from torch import nn

from experiments.adaptation import Batches, grad_x_weight, sensitivity
from taso.config import ImportanceSource


def estimate_importance(
    model: nn.Module,
    weights: dict[str, nn.Parameter],
    batches: Batches,
    num_batches: int,
    source: ImportanceSource | str,
    seed: int,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], int]:
    """Importance matrix (same shape as the weight, float32) for each named weight, and the
    number of batches it was accumulated over (0 for the data-free sources)."""
    source = ImportanceSource(source)
    if source == ImportanceSource.weight:
        return {name: w.detach().abs().float() for name, w in weights.items()}, 0
    if source == ImportanceSource.random:
        gen = torch.Generator().manual_seed(seed)
        return {name: torch.rand(w.shape, generator=gen) for name, w in weights.items()}, 0
    score = grad_x_weight if source == ImportanceSource.grad_x_weight else lambda g, _w: g.abs()
    return sensitivity(model, weights, batches, num_batches, device, score, desc="TASO importance")
