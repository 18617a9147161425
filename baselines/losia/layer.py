"""LoSiA's building blocks (Wang et al., EMNLP 2025; docs/papers.md 2.2): the subnet layer, the
sensitivity score it records, the greedy localisation and the budget-matched subnet shapes.

A managed ``nn.Linear`` keeps its pretrained weight frozen with a *hole* at the subnet
block R x C; the dense block W[R, C] itself is the trainable parameter (high-rank update,
no low-rank factors). Each forward puts the block into a copy of the frozen weight (|R| |C|
writes into a d_out x d_in copy, which bf16 autocast makes anyway) and runs one product:

    W_eff = W_hole + S_R W[R, C] S_C^T,   y = x W_eff^T + b                  (subnet forward)

what a dense ``nn.Linear`` holding W_eff computes, bit for bit. Backward, with g = ∂L/∂y:

    ∂L/∂x = g W_eff
    LoSiA:      G = g^T x (d_out x d_in, the full weight gradient), ∂L/∂W[R, C] = G[R, C]
    LoSiA-Pro:  ∂L/∂W[R, C] = g[..., R]^T x[..., C]     (docs/papers.md 2.2 (11); G never formed)

(A scatter of the block's own product x[..., C] W[R, C]^T into the rows R of the frozen
product, and of g[..., R] W[R, C] into the columns C of the input gradient, would pass over
the n x d_out output and the n x d_in input gradient once more each.)

Sensitivity (docs/papers.md 2.2 (7)), recorded from G while the layer's slot records:
s = W ⊙ G, s_abs = |s - ½ s²| (``param_mix``; ``param_first`` |s|, ``param_second`` |s²|),
Ī ← β1 Ī + (1-β1) s_abs, Ū ← β2 Ū + (1-β2) |s_abs - Ī|, score S = Ī ⊙ Ū.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from baselines.losia.config import Taylor
from experiments.adaptation import MethodLayer, autocast_off, compute_dtype, gather_columns, line_scores, top_indices


def subnet_shapes(shapes: dict[str, tuple[int, int]], budget: int) -> tuple[float, dict[str, tuple[int, int]]]:
    """LoSiA's rank factor p and each matrix's subnet (rows, cols) for a parameter budget.

    p solves sum_m (p d_out_m)(p d_in_m) = budget, i.e. p = sqrt(budget / sum_m d_out_m d_in_m)
    (MiniLM at r1: p = 1/16 exactly). Sides are rounded down (at least 1); then, while a line
    brings the total closer to the budget, the side furthest below its exact share p d gets
    one more line, so the count stays within one line of the budget.
    """
    entries = sum(d_out * d_in for d_out, d_in in shapes.values())
    if budget > entries:
        raise ValueError(
            f"the budget of {budget} parameters (budget.rank) exceeds the {entries} entries of the target matrices "
            "(model.target_modules): a subnet is a part of each matrix; lower budget.rank"
        )
    p = math.sqrt(budget / entries)
    sides = {name: [max(1, int(p * d_out)), max(1, int(p * d_in))] for name, (d_out, d_in) in shapes.items()}
    total = sum(r * c for r, c in sides.values())
    while True:
        # (deficit relative to p d, cost of one more line, matrix, side)
        options = [
            (sides[n][s] / (p * shapes[n][s]), sides[n][1 - s], n, s)
            for n in shapes
            for s in (0, 1)
            if sides[n][s] < shapes[n][s]
        ]
        useful = [o for o in options if abs(total + o[1] - budget) < abs(total - budget)]
        if not useful:
            break
        _, cost, name, side = min(useful)
        sides[name][side] += 1
        total += cost
    return p, {name: (r, c) for name, (r, c) in sides.items()}


def localize(scores: torch.Tensor, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy core block of a score matrix (docs/papers.md 2.2 (8)): the best of three candidates
    by block sum Σ S[R, C] — PureGreedy (rows and columns by their own sums), Row2Column
    (rows first, then columns summed over those rows) and Column2Row (the converse)."""
    row_sums, col_sums = line_scores(scores)
    rows, cols = top_indices(row_sums, n_rows), top_indices(col_sums, n_cols)
    candidates = [
        (rows, cols),
        (rows, top_indices(scores[rows].sum(0), n_cols)),
        (top_indices(scores[:, cols].sum(1), n_rows), cols),
    ]
    return max(candidates, key=lambda rc: float(scores[rc[0]][:, rc[1]].sum()))


class _SubnetLinearFunction(torch.autograd.Function):
    """Forward and backward of :class:`SubnetLinear` (the equations in the module docstring).

    With ``layer.full_gradient`` the backward forms the full weight gradient G (LoSiA, and
    LoSiA-Pro for a recording layer) and hands it to the layer's sensitivity record; without
    it only x[..., C] is saved and the block gradient is formed directly (LoSiA-Pro).
    Under autocast (any device) the products run in the autocast dtype in both directions, by
    the harness's one policy (:func:`experiments.adaptation.compute_dtype`); the parameters
    stay float32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, block, rows, cols, layer):  # noqa: ANN001, ANN205
        dtype = compute_dtype(x, weight)
        with autocast_off(x):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            effective = weight.to(dtype, copy=True)
            effective[rows.unsqueeze(1), cols] = block.to(dtype)
            y = F.linear(x2, effective, None if bias is None else bias.to(dtype))
        ctx.full = layer.full_gradient
        ctx.layer = layer
        ctx.save_for_backward(x2 if ctx.full else gather_columns(x2, cols), effective, rows, cols)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        saved_x, effective, rows, cols = ctx.saved_tensors
        grad_x = grad_bias = grad_block = None
        with autocast_off(grad_y):
            g = grad_y.reshape(-1, grad_y.shape[-1]).to(effective.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = (g @ effective).view(*grad_y.shape[:-1], effective.shape[1])
            if ctx.needs_input_grad[2]:
                grad_bias = g.sum(0)
            if ctx.needs_input_grad[3]:
                if ctx.full:
                    full = g.T @ saved_x
                    ctx.layer.observe(full)
                    grad_block = full[rows.unsqueeze(1), cols]
                else:
                    grad_block = gather_columns(g, rows).T @ saved_x
        return grad_x, None, grad_bias, grad_block, None, None, None


class SubnetLinear(MethodLayer):
    """A frozen ``nn.Linear`` whose subnet block W[rows, cols] is the trainable ``block``."""

    def __init__(self, base: nn.Linear, rows: torch.Tensor, cols: torch.Tensor, taylor: Taylor | str, betas: tuple[float, float]) -> None:
        super().__init__()
        taylor = Taylor(taylor)
        self.base = base
        base.weight.requires_grad_(False)
        device = base.weight.device
        self.register_buffer("rows", rows.to(device=device, dtype=torch.long))
        self.register_buffer("cols", cols.to(device=device, dtype=torch.long))
        self.block = nn.Parameter(torch.empty(len(rows), len(cols), device=device, dtype=base.weight.dtype))
        self.taylor = taylor
        self.betas = betas
        self.full_gradient = True  # form G in backward (LoSiA always; LoSiA-Pro while recording)
        self.recording = False
        self.mean_sens: torch.Tensor | None = None  # Ī
        self.uncertainty: torch.Tensor | None = None  # Ū
        self._cut_block()

    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows.unsqueeze(1), self.cols.unsqueeze(0)

    @torch.no_grad()
    def _cut_block(self) -> None:
        """Move W[R, C] into ``block`` and leave zeros (the hole) in the frozen weight."""
        self.block.copy_(self.base.weight[self._index()])
        self.base.weight[self._index()] = 0

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """W_hole with the trained block put back: the weight the layer computes with."""
        weight = self.base.weight.clone()
        weight[self._index()] = self.block
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SubnetLinearFunction.apply(x, self.base.weight, self.base.bias, self.block, self.rows, self.cols, self)

    @torch.no_grad()
    def observe(self, grad_weight: torch.Tensor) -> None:
        """One sensitivity update (module docstring) from the full weight gradient G."""
        if not self.recording:
            return
        s = self.effective_weight().float() * grad_weight.float()
        if self.taylor == "param_mix":
            s_abs = (s - 0.5 * s * s).abs()
        elif self.taylor == "param_first":
            s_abs = s.abs()
        else:
            s_abs = (s * s).abs()
        beta1, beta2 = self.betas
        if self.mean_sens is None:
            self.mean_sens, self.uncertainty = torch.zeros_like(s_abs), torch.zeros_like(s_abs)
        self.mean_sens.mul_(beta1).add_(s_abs, alpha=1 - beta1)
        self.uncertainty.mul_(beta2).add_((s_abs - self.mean_sens).abs(), alpha=1 - beta2)

    @torch.no_grad()
    def relocalize(self) -> bool:
        """Write the block back into the weight, choose the new block from the recorded score
        S = Ī ⊙ Ū, cut it out, clear the record; False (nothing changed) without a record."""
        if self.mean_sens is None:
            return False
        scores = (self.mean_sens * self.uncertainty).to(self.rows.device)
        self.mean_sens = self.uncertainty = None
        self.base.weight[self._index()] = self.block
        rows, cols = localize(scores, len(self.rows), len(self.cols))
        self.rows.copy_(rows)
        self.cols.copy_(cols)
        self._cut_block()
        return True

    def extra_repr(self) -> str:
        return f"rows={len(self.rows)}/{self.base.out_features}, cols={len(self.cols)}/{self.base.in_features}"
