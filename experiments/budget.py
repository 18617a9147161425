"""Trainable-parameter budgets and the target modules they are counted on.

``budget=rK`` means the number of parameters of LoRA with rank K on the model's target
modules: ``K * sum(d_in + d_out)`` over the adapted ``nn.Linear`` layers (docs/papers.md 8.1).
Classifier heads are counted apart (``head_params``), never inside the budget.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from experiments.adaptation import matches, target_linears


def lora_param_count(model: nn.Module, targets: list[str], rank: int) -> int:
    """Trainable parameters of LoRA rank ``rank``: sum over targets of r * (d_in + d_out)."""
    return sum(rank * (m.in_features + m.out_features) for m in target_linears(model, targets).values())


def count_params(model: nn.Module, head_modules: list[str]) -> dict[str, int]:
    """Split the trainable count into head and non-head (adapter / backbone) parameters."""
    head_ids: set[int] = set()
    for name, module in model.named_modules():
        if matches(name, head_modules):
            head_ids.update(id(p) for p in module.parameters())
    trainable = head = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            if id(p) in head_ids:
                head += p.numel()
            else:
                trainable += p.numel()
    return {"trainable_params": trainable, "head_params": head, "total_params": total}


def allocate_ranks(scores: Sequence[float], total: int, min_rank: int = 0) -> list[int]:
    """Integer ranks proportional to ``scores`` that sum to ``total`` exactly.

    Every entry first gets ``min_rank``; the remaining ``total - n * min_rank`` ranks are
    shared by the largest-remainder rule, r_i = floor(q_i) (+1 for the largest fractional
    parts) with quotas q_i = free * s_i / sum_j s_j (equal quotas when every score is 0).
    """
    n = len(scores)
    free = total - n * min_rank
    if n == 0 or free < 0:
        raise ValueError(f"cannot give {n} entries at least {min_rank} each out of {total}")
    if any(s < 0 for s in scores):
        raise ValueError("rank-allocation scores must be non-negative")
    mass = float(sum(scores))
    quotas = [free * s / mass if mass > 0 else free / n for s in scores]
    ranks = [int(q) for q in quotas]
    by_remainder = sorted(range(n), key=lambda i: (ranks[i] - quotas[i], i))
    for i in by_remainder[: free - sum(ranks)]:
        ranks[i] += 1
    return [min_rank + r for r in ranks]
