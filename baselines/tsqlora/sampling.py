"""TsqLoRA's quality-aware sampling: the quality score Q(x_i) of every training example and
the draw of the kept subset (:mod:`baselines.tsqlora.method` gives the equations and readings)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from experiments.adaptation import matches

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, or squared error for a one-output (regression) head."""
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.float()) ** 2
    return F.cross_entropy(logits, labels.long(), reduction="none")


def zscore(values: torch.Tensor) -> torch.Tensor:
    std = values.std()
    return (values - values.mean()) / std if std > 0 else torch.zeros_like(values)


def batch_stream(dataset: Any, batch_size: int, collate: Collate, seed: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (a new seeded order each pass), padded by ``collate``, from the
    ``start``-th batch of that sequence on (a resumed run's position; the skipped batches are
    not built)."""
    epoch, skip = divmod(start, math.ceil(len(dataset) / batch_size))
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        for index in order.split(batch_size)[skip:]:
            yield collate([dataset[int(i)] for i in index])
        epoch, skip = epoch + 1, 0


def endless(batches: Callable[[], Iterable[dict[str, torch.Tensor]]]) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of ``batches()`` pass after pass."""
    while True:
        yield from batches()


def output_layer(model: nn.Module, head_modules: list[str]) -> nn.Linear:
    """The last ``nn.Linear`` of the task head (the one that produces the logits)."""
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(matches(n, [h]) or f"{h}." in n for h in head_modules)]
    if not linears:
        raise ValueError(f"TsqLoRA: no nn.Linear in the head modules {head_modules}")
    return linears[-1]


@torch.no_grad()
def quality_scores(
    model: nn.Module,
    dataset: Any,
    collate: Collate,
    head: nn.Linear,
    batch_size: int,
    eta: float,
    alphas: list[float],
    device: torch.device,
) -> torch.Tensor:
    """Q(x_i) of every example (module docstring), in dataset order; ``collate`` pads a batch."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    was_training = model.training
    model.eval()
    deltas, features, grad_norms, loss_drops = [], [], [], []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            labels = batch["labels"].to(device)
            captured.clear()
            logits = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits.float()
            h = torch.cat([captured[-1].float(), torch.ones_like(logits[:, :1])], dim=1)  # [h_i, 1]
            with torch.enable_grad():
                z = logits.detach().requires_grad_(True)
                loss = per_sample_loss(z, labels)
                delta = torch.autograd.grad(loss.sum(), z)[0]
            h_sq = (h * h).sum(1)
            grad_norms.append(delta.norm(dim=1) * h_sq.sqrt())
            loss_drops.append(loss - per_sample_loss(logits - eta * delta * h_sq.unsqueeze(1), labels))
            deltas.append(delta)
            features.append(h)
    finally:
        hook.remove()
        model.train(was_training)
    delta, h, grad_norm = torch.cat(deltas), torch.cat(features), torch.cat(grad_norms)
    mean_grad = delta.T @ h / len(delta)  # mean of δ_i ⊗ [h_i, 1]
    alignment = ((delta @ mean_grad) * h).sum(1) / (grad_norm * mean_grad.norm() + 1e-12)
    terms = (grad_norm, torch.cat(loss_drops), alignment)
    return sum(a * zscore(t.cpu()) for a, t in zip(alphas, terms))


def sample_by_quality(scores: torch.Tensor, keep_fraction: float, temperature: float, seed: int) -> torch.Tensor:
    """Indices (ascending) of round(ρ N) examples drawn without replacement, p ∝ exp(Q / τ)
    (Gumbel top-k; τ = 0: the top-Q examples)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction={keep_fraction} must lie in (0, 1]")
    k = max(1, round(keep_fraction * len(scores)))
    keys = scores.float()
    if temperature > 0:
        uniform = torch.rand(len(scores), generator=torch.Generator().manual_seed(seed)).clamp_min(1e-20)
        keys = keys / temperature - torch.log(-torch.log(uniform))
    return torch.topk(keys, k).indices.sort().values
