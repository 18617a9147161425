"""Per-matrix ranks of the adaptive-rank baselines (AdaLoRA, SoRA): counting and storage.

Both methods end with a rank r_m per adapted matrix m, every kept rank being one triplet: a
column of the up projection (d_out), a row of the down projection (d_in) and one scalar (the
singular value λ of AdaLoRA, docs/papers.md 5.1; the gate g of SoRA, docs/papers.md 4.1). The AdaLoRA
paper counts a triplet as 1 + d1 + d2 parameters (its budget b(T) counts triplets), so

    effective_params = Σ_m r_m · (d_in(m) + d_out(m) + 1)

which is what results.json records as ``effective_params``; ``rank_pattern.json`` keeps the
final ranks per matrix, named as the pretrained model names its ``nn.Linear`` layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from experiments.budget import target_linears

RANK_PATTERN_FILE = "rank_pattern.json"


def matrix_shapes(model: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """``(d_in, d_out)`` of every target ``nn.Linear``, read before any adapter wraps it."""
    return {name: (m.in_features, m.out_features) for name, m in target_linears(model, targets).items()}


def effective_params(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> int:
    """Σ r · (d_in + d_out + 1) over the adapted matrices (one triplet per kept rank)."""
    missing = set(ranks) - set(shapes)
    if missing:
        raise KeyError(f"ranks for matrices without a known shape: {sorted(missing)[:3]}")
    return sum(r * (shapes[name][0] + shapes[name][1] + 1) for name, r in ranks.items())


def rank_summary(ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """The figures results.json records: effective count, total / min / max / mean rank."""
    values = list(ranks.values())
    return {
        "effective_params": effective_params(ranks, shapes),
        "rank_total": sum(values),
        "rank_min": min(values),
        "rank_max": max(values),
        "rank_mean": sum(values) / len(values),
    }


def write_rank_pattern(run_dir: str, ranks: Mapping[str, int], **info: Any) -> Path:
    """``<run_dir>/rank_pattern.json``: ``{"ranks": {matrix: rank}, **info}``."""
    path = Path(run_dir) / RANK_PATTERN_FILE
    path.write_text(json.dumps({**info, "ranks": dict(sorted(ranks.items()))}, indent=2) + "\n")
    return path
