"""``method=taso``: Task-Aligned Sparse Optimization (Miao et al., EMNLP 2025; docs/taso.md).

1. Importance I = |θ ⊙ ∂L/∂θ| of every targeted pretrained weight on the downstream task,
   accumulated over ``importance_batches`` training batches (:mod:`taso.importance`).
2. Core rows and columns per matrix from the row / column sums of I, as many as the budget
   allows: with rank R inside the block, rho = K / R of each side for budget rK
   (:mod:`taso.selection`). R <= K would be plain LoRA rank R (rho >= 1) and is rejected.
3. LoRA restricted to the core block (B on the core rows, A on the core columns), base
   weights frozen, trained with the sparsity-aware learning rate
       lr_adapter = lr * (1 / rho) ** gamma                             (``lr_gamma``)
   (the paper scales the rate with the sparsity level; its formula was not recoverable, so
   gamma is an option: 0 = off, 0.5 = square-root, 1 = full compensation). The classifier
   head trains at the base rate, as in every GLUE PEFT baseline.

The structure is fixed once, before training (no re-estimation, unlike LoSiA). Defaults
and the measurement behind them: docs/taso_ablation_full.md.

Resuming: a resumed run estimates the importance again (deterministic on the same seeded
batches, up to a device's non-deterministic sums); the core regions it trained are restored
anyway: the layers' ``rows`` / ``cols`` buffers with the model's weights, the regions the
results record (``core_regions.safetensors``) as the method's state (:meth:`Taso.state_dict`).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from experiments.adaptation import check_budget, target_linears
from experiments.methods import Method, PrepareContext, freeze_all_but, register_method
from taso.adapter import inject, merge, replace_by_base, save_adapter, save_core_regions, sparse_layers
from taso.config import TasoConfig
from taso.importance import estimate_importance
from taso.selection import CoreRegion, select_core_regions


def check_block_rank(rank: int, budget_rank: int, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse a block rank R above a target matrix's smaller side d: its core block would keep
    rho d = K d / R < K lines of each side, fewer than the budget rank K (docs/papers.md 1.5)."""
    name, (d_out, d_in) = min(shapes.items(), key=lambda item: min(item[1]))
    if rank > min(d_out, d_in):
        side = max(1, round(budget_rank * min(d_out, d_in) / rank))
        raise ValueError(
            f"TASO's block rank R={rank} (method.rank, default 8 x budget.rank={budget_rank}) exceeds the smaller side "
            f"({min(d_out, d_in)}) of target matrix {name} ({d_out}x{d_in}): its core block would be about {side} lines "
            f"wide, less than the budget rank {budget_rank}. Lower budget.rank or set method.rank <= {min(d_out, d_in)}."
        )


@register_method("taso", TasoConfig)
class Taso(Method):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.regions: dict[str, CoreRegion] = {}
        self.importances: dict | None = None
        self.importance_time_s = 0.0
        self.importance_batches_used = 0
        self.rank = 0
        self.rho = 0.0

    def block_rank(self, budget_rank: int) -> int:
        rank = self.cfg.rank if self.cfg.rank is not None else 8 * budget_rank
        if rank <= budget_rank:
            raise ValueError(
                f"TASO with method.rank={rank} and budget r{budget_rank} keeps rho={budget_rank / rank:g} >= 1 of "
                f"every row and column: that is plain LoRA rank {rank}, not TASO. Choose method.rank > {budget_rank}."
            )
        return rank

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        self.rank = self.block_rank(ctx.budget_rank)
        self.rho = ctx.budget_rank / self.rank
        targets = target_linears(model, ctx.target_modules)
        check_block_rank(self.rank, ctx.budget_rank, {name: tuple(layer.weight.shape) for name, layer in targets.items()})
        model.to(ctx.device)
        start = time.perf_counter()
        importances, self.importance_batches_used = estimate_importance(
            model,
            {name: layer.weight for name, layer in targets.items()},
            lambda: ctx.train_batches(sorted_prefix=self.cfg.importance_batches),
            self.cfg.importance_batches,
            self.cfg.importance,
            ctx.seed,
            ctx.device,
        )
        self.importance_time_s = time.perf_counter() - start
        self.regions = select_core_regions(importances, self.rho, self.cfg.scope, self.cfg.granularity, ctx.seed)
        self.importances = importances if self.cfg.save_importance else None

        freeze_all_but(model, ctx.head_modules)
        alpha = self.cfg.alpha if self.cfg.alpha is not None else 2 * self.rank
        index_sets = {n: (r.rows, r.cols) for n, r in self.regions.items() if len(r.rows) and len(r.cols)}
        inject(model, index_sets, self.rank, alpha)

        trainable = self.rank * sum(len(rows) + len(cols) for rows, cols in index_sets.values())
        check_budget(trainable, ctx.budget_params, "TASO", f"the matrices are too small for rank {self.rank}; lower method.rank")
        return model

    def state_dict(self) -> dict[str, Any]:
        """The core regions (indices and scores) of every target matrix."""
        return {"regions": {name: asdict(region) for name, region in self.regions.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The checkpoint's core regions; refused when the selection made now has other sizes
        (its adapter could not take the checkpoint's weights)."""
        regions = {name: CoreRegion(**{k: v.cpu() for k, v in region.items()}) for name, region in state["regions"].items()}
        sizes = {name: (len(r.rows), len(r.cols)) for name, r in regions.items()}
        now = {name: (len(r.rows), len(r.cols)) for name, r in self.regions.items()}
        if sizes != now:
            differ = sorted(n for n in sizes.keys() | now.keys() if sizes.get(n) != now.get(n))
            raise ValueError(
                f"TASO: the checkpoint's core regions have other (rows, cols) counts than the ones selected now for {differ[:3]} "
                "(a different importance estimate): it cannot be resumed; delete the run's checkpoints to start over"
            )
        self.regions = regions

    @property
    def lr_scale(self) -> float:
        return (1.0 / self.rho) ** self.cfg.lr_gamma

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        adapter = [p for layer in sparse_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
        adapter_ids = {id(p) for p in adapter}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
        return [
            {"params": adapter, "lr": lr * self.lr_scale, "weight_decay": weight_decay},
            {"params": rest, "lr": lr, "weight_decay": weight_decay},
        ]

    def extra_results(self, model: nn.Module) -> dict[str, Any]:
        layers = sparse_layers(model)
        return {
            "importance_time_s": self.importance_time_s,
            "taso": {
                "rank": self.rank,
                "rho": self.rho,
                "lr_gamma": self.cfg.lr_gamma,
                "lr_scale": self.lr_scale,
                "scope": self.cfg.scope,
                "granularity": self.cfg.granularity,
                "importance": self.cfg.importance,
                "importance_batches": self.importance_batches_used,
                "adapted_matrices": len(layers),
                "target_matrices": len(self.regions),
            },
        }

    def save_artifacts(self, model: nn.Module, run_dir: str) -> None:
        save_adapter(model, Path(run_dir) / "adapter.safetensors")
        save_core_regions(self.regions, self.importances, Path(run_dir) / "core_regions.safetensors")

    def merged_model(self, model: nn.Module) -> nn.Module:
        merge(model)
        replace_by_base(model)
        return model
