"""``method=tsqlora``: TsqLoRA, sensitivity- and quality-aware LoRA (Chen et al., arXiv
2509.18585; papers.md 3).

1. Quality-aware sampling (papers.md 3.1 (3)-(4)), once, before training, on the pretrained
   model: every training example gets
       Q(x_i) = α1 ||∇_θ ℓ_i||₂ + α2 Δℓ_i + α3 ΔC_i,   Δℓ_i = ℓ_i(θ) - ℓ_i(θ - η ∇_θ ℓ_i)
   (each term z-normalised over the training set) and a fraction ``keep_fraction`` of the
   set is drawn without replacement with p(x_i) ∝ exp(Q(x_i) / τ) (Gumbel top-k).
2. Sensitivity-aware rank allocation (papers.md 3.1 (5)-(6)): the sensitivity of matrix l,
       S_l = E_{(x, y) ~ S} |W_l ⊙ ∇_{W_l} ℓ(x, y)|
   (mean over elements and ``sensitivity_batches`` batches of the selected subset, TASO's
   estimator :mod:`taso.importance`), sets its rank r_l ∝ S_l (largest remainder,
   :func:`experiments.budget.allocate_ranks`); ranks are initialised from the selected data
   and re-allocated every ``realloc_every`` steps on fresh batches, with S_l smoothed by an
   EMA of factor ``sensitivity_beta``. The parameter count is the budget's at every step
   (:mod:`baselines.rank_pool`).

Readings where the paper is silent (papers.md 3.2-3.3: α, η, τ, subset size, allocation
rule and schedule were NOT RECOVERED), each an option:

- θ in the per-sample terms is the task head's output layer: its per-sample gradient is
  δ_i ⊗ [h_i, 1] (δ_i = ∂ℓ_i/∂logits, h_i its input), so ||∇ℓ_i|| = ||δ_i|| (||h_i||² + 1)^½
  and the hypothetical SGD step moves the logits by -η δ_i (||h_i||² + 1), all in closed
  form from one batched forward pass (papers.md 3.3 suggests restricting to the last layers).
- ΔC_i (undefined in the sources) is the cosine between the sample's gradient and the mean
  gradient over the training set (papers.md 3.3's proxy); α = (1, 1, 1), τ = 1 on z-scores,
  η = the method's learning rate.
- ``keep_fraction`` 0.7 and ``realloc_every`` 100 (AdaLoRA's ΔT for the large GLUE sets,
  papers.md 5.2) are our defaults, not the paper's.
- "Layer" is one target matrix; ranks move only between matrices of the same shape, so the
  rank budget K n of every shape group (and so the LoRA rank-K parameter count) is exact;
  a matrix may fall to rank 0 (``min_rank``). Scaling s is fixed (``scaling`` 2 = LoRA's
  alpha / r here) so a rank change does not rescale the other units.
- Known limitation: resuming from a checkpoint restores the pools' weights but not which
  matrix owns which unit (the allocation restarts from rank K everywhere).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from baselines.rank_pool import PooledLoraLinear, RankPool
from experiments.budget import allocate_ranks, matches, target_linears
from experiments.methods import Method, MethodConfig, PrepareContext, freeze_all_but, register_method
from taso.adapter import set_submodule
from taso.importance import estimate_importance

Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


@dataclass
class TsqLoraConfig(MethodConfig):
    lr: float = 5e-4  # LoRA's rate in this harness
    keep_fraction: float = 0.7  # ρ, share of the training set kept (our default)
    temperature: float = 1.0  # τ of p(x) ∝ exp(Q / τ); 0 keeps the top-Q examples
    alphas: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # α1 grad norm, α2 Δℓ, α3 ΔC
    eta: Optional[float] = None  # η of the hypothetical step; None: the method's lr
    scoring_batch_size: int = 32
    sensitivity_batches: int = 4  # batches behind each S_l estimate
    sensitivity_beta: float = 0.85  # EMA of S_l across re-allocations (AdaLoRA's β)
    realloc_every: int = 100  # steps between re-allocations (our default)
    min_rank: int = 0
    scaling: float = 2.0  # s in y = W x + s B A x, LoRA's alpha / r in this harness


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, or squared error for a one-output (regression) head."""
    if logits.shape[-1] == 1:
        return (logits.squeeze(-1) - labels.float()) ** 2
    return F.cross_entropy(logits, labels.long(), reduction="none")


def zscore(values: torch.Tensor) -> torch.Tensor:
    std = values.std()
    return (values - values.mean()) / std if std > 0 else torch.zeros_like(values)


def batch_stream(dataset: Any, batch_size: int, collate: Collate, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (a new seeded order each pass), padded by ``collate``."""
    epoch = 0
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch))
        for index in order.split(batch_size):
            yield collate([dataset[int(i)] for i in index])
        epoch += 1


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


@register_method("tsqlora", TsqLoraConfig)
class TsqLora(Method):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.model: nn.Module | None = None
        self.layers: dict[str, PooledLoraLinear] = {}
        self.pools: dict[str, RankPool] = {}
        self.sensitivity: dict[str, float] = {}
        self.batches: Callable[[], Iterator[dict[str, torch.Tensor]]] | None = None
        self.device = torch.device("cpu")
        self.seed = 0
        self.generator = torch.Generator()
        self.reallocations = 0
        self.units_moved = 0
        self.scoring_time_s = 0.0
        self.kept = (0, 0)

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        if ctx.task_type != "seq_cls":
            raise ValueError(
                f"TsqLoRA supports sequence classification only, not {ctx.task_type}: its quality score is "
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
            for i, name in enumerate(names):  # uniform start: rank K each
                units = torch.arange(i * ctx.budget_rank, (i + 1) * ctx.budget_rank)
                self.layers[name] = PooledLoraLinear(targets[name], pool, units, self.cfg.scaling)
                set_submodule(model, name, self.layers[name])
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
        stream = batch_stream(subset, self.cfg.scoring_batch_size, ctx.collate, self.seed)
        self.batches = lambda: stream
        self.reallocate(None)
        self.scoring_time_s = time.perf_counter() - start
        self.kept = (len(subset), len(dataset))
        return subset

    def estimate_sensitivity(self) -> dict[str, float]:
        """S_l = mean |W_l ⊙ ∇_{W_l} ℓ| over elements and batches, for every target matrix."""
        importances, used = estimate_importance(
            self.model, {n: layer.base.weight for n, layer in self.layers.items()}, self.batches,
            self.cfg.sensitivity_batches, "grad_x_weight", self.seed, self.device, desc="TsqLoRA sensitivity",
        )
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

    def callbacks(self) -> list[TrainerCallback]:
        return [TsqLoraCallback(self)]

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


class TsqLoraCallback(TrainerCallback):
    """Re-allocates the ranks every ``realloc_every`` optimizer steps."""

    def __init__(self, method: TsqLora) -> None:
        self.method = method

    def on_step_end(self, args, state, control, optimizer: Optional[torch.optim.Optimizer] = None, **kwargs):  # noqa: ANN001
        if state.global_step % self.method.cfg.realloc_every == 0:
            self.method.reallocate(optimizer)
