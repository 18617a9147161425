"""Stage 1 of TASO: task-specific importance of the pretrained weights.

For every targeted weight matrix W the first-order Taylor (sensitivity) score of the
paper (papers.md 1.1 (2)) is accumulated over ``N`` batches of the downstream task:

    I = sum_b | W ⊙ ∂L_b/∂W |                                                    (TASO, Eq. I)

with L_b the supervised loss of batch b on the frozen pretrained model. The sum is of
per-batch absolute values (papers.md 1.5, "aggregation"). The model is run in eval mode
(dropout off) so that the selection is a deterministic function of the data and the seed.
Gradients are taken with ``torch.autograd.grad`` for the target weights only: no ``.grad``
is left behind, no optimizer state exists, and the weights are not written.

Ablation sources (``method.importance``): ``grad`` (sum_b |∂L_b/∂W|), ``weight`` (|W|, no
data) and ``random`` (uniform scores from the run's seed).
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


def _batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    inputs = {k: v.to(device) for k, v in batch.items()}
    return model(**inputs).loss


def estimate_importance(
    model: nn.Module,
    weights: dict[str, nn.Parameter],
    batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    num_batches: int,
    source: str,
    seed: int,
    device: torch.device,
    desc: str = "TASO importance",
) -> tuple[dict[str, torch.Tensor], int]:
    """Importance matrix (same shape as the weight, float32) for each named weight, and the
    number of batches it was accumulated over (all of them when the training set is smaller
    than ``num_batches``); ``desc`` labels the progress bar."""
    if source == "weight":
        return {name: w.detach().abs().float() for name, w in weights.items()}, 0
    if source == "random":
        gen = torch.Generator().manual_seed(seed)
        return {name: torch.rand(w.shape, generator=gen) for name, w in weights.items()}, 0
    if source not in ("grad_x_weight", "grad"):
        raise ValueError(f"unknown importance source {source!r}; valid: grad_x_weight, grad, weight, random")
    if num_batches < 1:
        raise ValueError("method.importance_batches must be at least 1")

    names, params = list(weights), list(weights.values())
    scores = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(True)
    seen = 0
    try:
        for batch in tqdm(batches(), total=num_batches, desc=desc, leave=False):
            loss = _batch_loss(model, batch, device)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for score, p, g in zip(scores, params, grads):
                    score.add_((g * p).abs() if source == "grad_x_weight" else g.abs())
            seen += 1
            if seen == num_batches:
                break
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if seen < num_batches:
        warnings.warn(f"{desc}: the training set gives {seen} batches, fewer than the {num_batches} asked for")
    return {name: score.cpu() for name, score in zip(names, scores)}, seen
