"""``method=tsqlora``: TsqLoRA, sensitivity- and quality-aware LoRA (Chen et al., arXiv
2509.18585; docs/papers.md 3).

1. Quality-aware sampling (docs/papers.md 3.1 (3)-(4)), once, before training, on the pretrained
   model: every training example gets
       Q(x_i) = α1 ||∇_θ ℓ_i||₂ + α2 Δℓ_i + α3 ΔC_i,   Δℓ_i = ℓ_i(θ) - ℓ_i(θ - η ∇_θ ℓ_i)
   (each term z-normalised over the training set) and a fraction ``keep_fraction`` of the
   set is drawn without replacement with p(x_i) ∝ exp(Q(x_i) / τ) (Gumbel top-k).
2. Sensitivity-aware rank allocation (docs/papers.md 3.1 (5)-(6)): the sensitivity of matrix l,
       S_l = E_{(x, y) ~ S} |W_l ⊙ ∇_{W_l} ℓ(x, y)|
   (mean over elements and ``sensitivity_batches`` batches of the selected subset,
   :func:`experiments.adaptation.sensitivity`), sets its rank r_l ∝ S_l (largest remainder,
   :func:`experiments.budget.allocate_ranks`); ranks are initialised from the selected data
   and re-allocated every ``realloc_every`` steps on fresh batches, with S_l smoothed by an
   EMA of factor ``sensitivity_beta``. The parameter count is the budget's at every step
   (:mod:`baselines.tsqlora.layer`).

Readings where the paper is silent (docs/papers.md 3.2-3.3: α, η, τ, subset size, allocation
rule and schedule were NOT RECOVERED), each an option:

- θ in the per-sample terms is the task head's output layer: its per-sample gradient is
  δ_i ⊗ [h_i, 1] (δ_i = ∂ℓ_i/∂logits, h_i its input), so ||∇ℓ_i|| = ||δ_i|| (||h_i||² + 1)^½
  and the hypothetical SGD step moves the logits by -η δ_i (||h_i||² + 1), all in closed
  form from one batched forward pass (docs/papers.md 3.3 suggests restricting to the last layers).
- ΔC_i (undefined in the sources) is the cosine between the sample's gradient and the mean
  gradient over the training set (docs/papers.md 3.3's proxy); α = (1, 1, 1), τ = 1 on z-scores,
  η = the method's learning rate.
- ``keep_fraction`` 0.7 and ``realloc_every`` 100 (AdaLoRA's ΔT for the large GLUE sets,
  docs/papers.md 5.2) are our defaults, not the paper's.
- "Layer" is one target matrix; ranks move only between matrices of the same shape, so the
  rank budget K n of every shape group (and so the LoRA rank-K parameter count) is exact;
  a matrix may fall to rank 0 (``min_rank``). Scaling s is fixed (``scaling`` 2 = LoRA's
  alpha / r here) so a rank change does not rescale the other units.

Resuming: the pools' weights and the frozen weights with the folded updates are in the model's
checkpoint; which matrix owns which unit, the smoothed S_l, the position in the stream of
sensitivity batches and the generator that re-initialises moved units are the method's state
(:meth:`TsqLora.state_dict`). The sampled subset is drawn again, identically, from the seed.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from baselines.tsqlora.config import TsqLoraConfig
from baselines.tsqlora.layer import PooledLoraLinear, RankPool
from baselines.tsqlora.sampling import batch_stream, endless, output_layer, quality_scores, sample_by_quality
from experiments.adaptation import replace_linears, sensitivity, target_linears
from experiments.budget import allocate_ranks
from experiments.methods import Method, PrepareContext, freeze_all_but, register_method


@register_method("tsqlora", TsqLoraConfig)
class TsqLora(Method):
    writes_frozen_weights: ClassVar[bool] = True  # a unit that moves folds its update into the frozen weight

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.layers: dict[str, PooledLoraLinear] = {}
        self.pools: dict[str, RankPool] = {}
        self.sensitivity: dict[str, float] = {}
        self.batches: Callable[[], Iterator[dict[str, torch.Tensor]]] | None = None
        self.subset_batches: Callable[..., Iterator[dict[str, torch.Tensor]]] | None = None  # batch_stream over the subset
        self.batches_drawn = 0  # sensitivity batches taken from the subset's stream
        self.device = torch.device("cpu")
        self.seed = 0
        self.generator = torch.Generator()
        self.reallocations = 0
        self.units_moved = 0
        self.scoring_time_s = 0.0
        self.kept = (0, 0)

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        if ctx.head_type != "seq_cls":
            raise ValueError(
                f"TsqLoRA supports sequence classification only, not {ctx.head_type}: its quality score is "
                "defined on one classification head's logits per example (no such head for multiple choice or a causal LM)"
            )
        targets = target_linears(model, ctx.target_modules)
        model.to(ctx.device)
        freeze_all_but(model, ctx.head_modules)
        self.generator.manual_seed(ctx.seed)
        groups: dict[str, list[str]] = {}
        for name, layer in targets.items():
            groups.setdefault(f"{layer.out_features}x{layer.in_features}", []).append(name)
        weight = next(iter(targets.values())).weight
        for key, names in groups.items():
            d_out, d_in = targets[names[0]].out_features, targets[names[0]].in_features
            pool = RankPool(ctx.budget_rank * len(names), d_out, d_in, weight.device, weight.dtype, self.generator)
            self.pools[key] = pool
            units = {name: torch.arange(i * ctx.budget_rank, (i + 1) * ctx.budget_rank) for i, name in enumerate(names)}  # rank K each
            self.layers.update(
                replace_linears(model, names, lambda name, base: PooledLoraLinear(base, pool, units[name], self.cfg.scaling))
            )
        model.add_module("tsqlora_pools", nn.ModuleDict(self.pools))
        self.model, self.device, self.seed = model, ctx.device, ctx.seed
        stream = endless(ctx.train_batches)
        self.batches = lambda: stream
        return model

    def select_train_data(self, dataset: Any, ctx: PrepareContext) -> Any:
        """Quality-aware sampling, then the initial ranks from the selected subset."""
        start = time.perf_counter()
        eta = self.cfg.eta if self.cfg.eta is not None else self.cfg.lr
        if ctx.collate is None:
            raise ValueError("TsqLoRA's quality scoring pads batches with the harness's collator: PrepareContext.collate is unset")
        head = output_layer(self.model, ctx.head_modules)
        scores = quality_scores(
            self.model, dataset, ctx.collate, head, self.cfg.scoring_batch_size, eta, list(self.cfg.alphas), self.device
        )
        keep = sample_by_quality(scores, self.cfg.keep_fraction, self.cfg.temperature, self.seed)
        subset = dataset.select(keep.tolist())
        self.subset_batches = functools.partial(batch_stream, subset, self.cfg.scoring_batch_size, ctx.collate, self.seed)
        self.draw_from(0)
        self.reallocate(None)
        self.scoring_time_s = time.perf_counter() - start
        self.kept = (len(subset), len(dataset))
        return subset

    def draw_from(self, start: int) -> None:
        """Take the sensitivity batches from the subset's stream, from its ``start``-th batch on."""
        stream = self.subset_batches(start=start)
        self.batches = lambda: stream
        self.batches_drawn = start

    def estimate_sensitivity(self) -> dict[str, float]:
        """S_l = mean |W_l ⊙ ∇_{W_l} ℓ| over elements and batches, for every target matrix."""
        importances, used = sensitivity(
            self.model, {n: layer.base.weight for n, layer in self.layers.items()}, self.batches,
            self.cfg.sensitivity_batches, self.device, desc="TsqLoRA sensitivity",
        )
        self.batches_drawn += used
        return {n: float(imp.mean()) / max(used, 1) for n, imp in importances.items()}

    def reallocate(self, optimizer: torch.optim.Optimizer | None) -> None:
        """EMA-smoothed sensitivities, then ranks ∝ S_l within every shape group."""
        fresh = self.estimate_sensitivity()
        beta = self.cfg.sensitivity_beta
        self.sensitivity = {n: beta * self.sensitivity[n] + (1 - beta) * s if n in self.sensitivity else s for n, s in fresh.items()}
        for pool in self.pools.values():
            names = [n for n, layer in self.layers.items() if layer.pool is pool]
            ranks = allocate_ranks([self.sensitivity[n] for n in names], pool.size, self.cfg.min_rank)
            self.units_moved += pool.reassign(ranks, optimizer, self.generator)
        self.reallocations += 1

    def ranks(self) -> dict[str, int]:
        return {n: layer.rank for n, layer in self.layers.items()}

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Re-allocate the ranks every ``realloc_every`` optimizer steps."""
        if step % self.cfg.realloc_every == 0:
            self.reallocate(optimizer)

    def state_dict(self) -> dict[str, Any]:
        """Each matrix's units, the smoothed S_l, the stream position, the generator, the counts."""
        return {
            "units": {n: layer.units for n, layer in self.layers.items()},
            "sensitivity": self.sensitivity,
            "batches_drawn": self.batches_drawn,
            "generator": self.generator.get_state(),
            "reallocations": self.reallocations,
            "units_moved": self.units_moved,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, layer in self.layers.items():
            layer.units = state["units"][name].to(layer.units.device)
        self.sensitivity = dict(state["sensitivity"])
        self.draw_from(state["batches_drawn"])
        self.generator.set_state(state["generator"].cpu())
        self.reallocations, self.units_moved = state["reallocations"], state["units_moved"]

    def extra_results(self, model: nn.Module) -> dict[str, Any]:
        return {
            "tsqlora": {
                "kept_examples": self.kept[0],
                "scored_examples": self.kept[1],
                "scoring_time_s": self.scoring_time_s,
                "reallocations": self.reallocations,
                "units_moved": self.units_moved,
                "ranks": self.ranks(),
            }
        }
