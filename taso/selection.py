"""Stage 2 of TASO: core rows and columns from the distribution of importance scores.

Row and column scores of a matrix: r_i = sum_j I_ij, c_j = sum_i I_ij.
With rank R inside the core block and the budget of LoRA rank K, the kept fraction is
rho = K / R, so that R * sum_m (|rows_m| + |cols_m|) = K * sum_m (d_out_m + d_in_m).

Readings of the selection rule the paper leaves open (``method.scope``):

- ``per_matrix``: every matrix keeps its top round(rho * d_out) rows and round(rho * d_in)
  columns by score.
- ``global``: rows and columns of all matrices compete, ranked by their mean importance per
  element (r_i / d_in, c_j / d_out, so that wide and narrow matrices are comparable); the top
  rho * sum(d_out) rows and rho * sum(d_in) columns are kept. Important matrices receive more
  of the budget; a matrix with neither rows nor columns receives no adapter. A matrix that
  got one side only receives its best line of the other side, paid for by dropping the
  lowest-scored lines elsewhere, so the budget stays exact.

Granularity (``method.granularity``): ``rows+cols`` selects both sides by importance;
``rows`` (``cols``) selects only that side by importance and draws the other side uniformly
at random with the same count. A dense other side cannot meet the budget (at K=1 and R>=2,
R * (rho * d_out + d_in) > d_out + d_in), so random indices are the budget-matched ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from experiments.adaptation import line_scores, top_indices
from taso.config import Granularity, Scope


@dataclass
class CoreRegion:
    """The core block of one weight matrix (indices sorted ascending) and the scores behind it."""

    rows: torch.Tensor
    cols: torch.Tensor
    row_scores: torch.Tensor
    col_scores: torch.Tensor


def _apply_granularity(
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]], granularity: Granularity, generator: torch.Generator
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, (rows, cols) in scores.items():
        if granularity == "rows":
            cols = torch.rand(cols.shape, generator=generator)
        elif granularity == "cols":
            rows = torch.rand(rows.shape, generator=generator)
        out[name] = (rows, cols)
    return out


def _per_matrix(scores: dict[str, tuple[torch.Tensor, torch.Tensor]], rho: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (top_indices(r, max(1, round(rho * r.numel()))), top_indices(c, max(1, round(rho * c.numel()))))
        for name, (r, c) in scores.items()
    }


def _global(scores: dict[str, tuple[torch.Tensor, torch.Tensor]], rho: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    names = list(scores)
    # every line: (normalised score, matrix index, side 0=row 1=col, index in the matrix)
    lines: list[tuple[float, int, int, int]] = []
    for m, name in enumerate(names):
        rows, cols = scores[name]
        lines += [(float(s) / cols.numel(), m, 0, i) for i, s in enumerate(rows.tolist())]
        lines += [(float(s) / rows.numel(), m, 1, j) for j, s in enumerate(cols.tolist())]
    lines.sort(key=lambda line: -line[0])
    n_rows = round(rho * sum(scores[n][0].numel() for n in names))
    n_cols = round(rho * sum(scores[n][1].numel() for n in names))
    kept = [line for line in lines if line[2] == 0][:n_rows] + [line for line in lines if line[2] == 1][:n_cols]
    target = len(kept)
    chosen: list[list[set[int]]] = [[set(), set()] for _ in names]
    for _, m, side, i in kept:
        chosen[m][side].add(i)
    # a one-sided matrix gets the best line of its missing side
    for m, name in enumerate(names):
        for side in (0, 1):
            if chosen[m][1 - side] and not chosen[m][side]:
                chosen[m][side].add(int(torch.argmax(scores[name][side])))
    # pay for the additions with the lowest-scored lines of sides that keep at least one
    excess = sum(len(s) for pair in chosen for s in pair) - target
    for _, m, side, i in sorted(kept, key=lambda line: line[0]):
        if excess <= 0:
            break
        if i in chosen[m][side] and len(chosen[m][side]) > 1:
            chosen[m][side].discard(i)
            excess -= 1
    return {
        name: (torch.tensor(sorted(chosen[m][0]), dtype=torch.long), torch.tensor(sorted(chosen[m][1]), dtype=torch.long))
        for m, name in enumerate(names)
    }


def select_core_regions(
    importances: dict[str, torch.Tensor], rho: float, scope: Scope | str, granularity: Granularity | str, seed: int
) -> dict[str, CoreRegion]:
    """Core rows and columns of every matrix; both are empty for a matrix that receives no
    adapter (possible with ``scope=global`` only)."""
    if not 0.0 < rho < 1.0:
        raise ValueError(f"kept fraction rho={rho} must lie in (0, 1)")
    scope, granularity = Scope(scope), Granularity(granularity)
    true_scores = {name: line_scores(imp) for name, imp in importances.items()}
    generator = torch.Generator().manual_seed(seed)
    ranking = _apply_granularity(true_scores, granularity, generator)
    picked = _per_matrix(ranking, rho) if scope == Scope.per_matrix else _global(ranking, rho)
    return {
        name: CoreRegion(rows, cols, true_scores[name][0], true_scores[name][1]) for name, (rows, cols) in picked.items()
    }
