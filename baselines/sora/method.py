"""SoRA, sparse low-rank adaptation (Ding et al., EMNLP 2023; docs/papers.md 4), official code's semantics.

Every target matrix gets a gated LoRA branch (:mod:`baselines.sora.layer`):

    h = W x + s · B (g ⊙ (A x)),     s = alpha / r_max

A, B and the task head train with the harness's AdamW; the gates g are kept out of it (so out
of its weight decay) and follow SoRA's proximal gradient method (docs/papers.md 4.1.3–4.1.4 and
4.5, the official code's form; the paper's equation numbers are not in docs/papers.md): after every
optimizer step, an Adam step on g with its own rate (the
run's rate unless ``gate_lr`` is set, following the run's warm-up/decay schedule, as the
official ``SparseAdamW``; its epsilon ``gate_eps`` 1e-6, that optimizer's default), then the proximal map with threshold ξ_t on the result z:

    official (default): g = 0 where |z| < 2 ξ_t, else z − sign(z) ξ_t    (docs/papers.md 4.5: what the
                        code's three in-place statements do; at |z| = ξ_t exactly the code keeps
                        z, this map gives 0)
    soft:               g = sign(z) · max(|z| − ξ_t, 0)                  (the textbook soft threshold)

ξ_t is ``threshold`` (the code's ``sparse_lambda_2``), not multiplied by the learning rate as in
the official default file (``threshold_times_lr: true`` gives the ``multiply_lr`` variant, ξ_t · lr_t).
``threshold_schedule``: ``constant`` (ξ); ``linear`` (from ``threshold_start`` to ξ over the
steps); ``staged`` (Algorithm 1's sparsifying scheduler within the run's steps: ``threshold_stages``
equal stages, ξ_t stepping through linspace(``threshold_start``, ξ, stages)).
The loss also carries the official differentiable L1 term η · Σ|g| / (number of gates),
η = ``l1_weight`` (``sparse_lambda``), added to the model's loss in training mode only, so the
logged ``train_loss`` includes it (as in the official trainer) and evaluation losses do not.

Budget ``rK``: the initial rank r_max is K (``rank`` overrides it), the rank of the LoRA the
budget is counted from, as the paper compares SoRA with r_max = r against LoRA rank r; the
gates can only remove ranks, so the final count is at most the budget. After training the
zero-gated ranks are removed (A, B, g physically shrink, the function is unchanged), the
adapter is saved pruned, and ``effective_params`` = Σ kept ranks · (d_in + d_out + 1) (the
gate entry is the "+1"; the official count, 2 × hidden per zero gate, is right only for square
matrices, docs/papers.md 4.5). α defaults to 2 r_max: the official α = 16 at r_max = 8, a scaling
of 2 at every rank. The head trains (docs/papers.md 4.4); layer norms stay frozen, so that only
the adapter and the head train, as for the other methods. The gates themselves are parameters
(in every checkpoint); their Adam moments and step count are the method's state
(:meth:`Sora.state_dict`), restored when a run resumes. ξ_t is a function of the step alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

from baselines.rank_pattern import matrix_shapes, rank_summary, write_rank_pattern
from baselines.sora.config import ProximalMap, SoraConfig, ThresholdSchedule
from baselines.sora.layer import GatedLoraLinear, inject_gated_lora, save_gated_adapter
from experiments.methods import Method, PrepareContext, freeze_all_but, register_method


def proximal_map(z: torch.Tensor, threshold: float, rule: ProximalMap | str) -> torch.Tensor:
    """The proximal step on the gates after their gradient step (module docstring)."""
    if ProximalMap(rule) == ProximalMap.official:
        return torch.where(z.abs() < 2 * threshold, torch.zeros_like(z), z - threshold * z.sign())
    return z.sign() * (z.abs() - threshold).clamp(min=0)


def scheduled_threshold(cfg: SoraConfig, step: int, total_steps: int) -> float:
    """ξ_t at optimizer step ``step`` (1..total_steps)."""
    start, end = cfg.threshold_start, cfg.threshold
    schedule = ThresholdSchedule(cfg.threshold_schedule)
    if schedule == ThresholdSchedule.constant:
        return end
    if schedule == ThresholdSchedule.linear:
        return start + (end - start) * step / total_steps
    stages = cfg.threshold_stages
    stage = min((step - 1) * stages // total_steps, stages - 1)
    return end if stages == 1 else start + (end - start) * stage / (stages - 1)


@register_method("sora", SoraConfig)
class Sora(Method):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.layers: dict[str, GatedLoraLinear] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.total_steps = 0
        self.r_max = 0
        self.gate_optimizer: Optional[torch.optim.Optimizer] = None

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        self.total_steps = ctx.require_total_steps(self.name)
        self.r_max = self.cfg.rank or ctx.budget_rank
        alpha = self.cfg.alpha if self.cfg.alpha is not None else 2 * self.r_max
        self.shapes = matrix_shapes(model, ctx.target_modules)
        freeze_all_but(model, ctx.head_modules)
        self.layers = inject_gated_lora(model, sorted(self.shapes), self.r_max, alpha, self.cfg.dropout)
        self.gate_optimizer = torch.optim.Adam(self.gates(), lr=0.0, eps=self.cfg.gate_eps)  # the rate is set every step
        model.register_forward_hook(self.add_l1_term)
        return model

    def gates(self) -> list[nn.Parameter]:
        return [layer.gate for layer in self.layers.values()]

    def add_l1_term(self, model: nn.Module, args: Any, output: ModelOutput) -> ModelOutput:
        """loss += η · Σ|g| / (number of gates), in training mode (docs/papers.md 4.1.4)."""
        if model.training and self.cfg.l1_weight and output.get("loss") is not None:
            gates = torch.cat(self.gates())
            output["loss"] = output["loss"] + self.cfg.l1_weight * gates.abs().sum() / gates.numel()
        return output

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Everything trainable except the gates, which have their own optimizer."""
        gate_ids = {id(g) for g in self.gates()}
        params = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After the main optimizer step (gradients still there, clipped with the rest): the gates'
        Adam step at the main schedule's current rate, then the proximal map; the Trainer's
        ``model.zero_grad()`` clears the gates' gradients next."""
        self.gate_step(step, optimizer.param_groups[0])

    def on_train_end(self) -> None:
        """Remove the ranks whose gate is zero (the function is unchanged)."""
        self.prune()

    def state_dict(self) -> dict[str, Any]:
        """The gates' optimizer (Adam moments, step count)."""
        return {"gate_optimizer": self.gate_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gate_optimizer.load_state_dict(state["gate_optimizer"])

    def gate_lr(self, main_group: dict) -> float:
        """The gates' rate now: the main group's scheduled rate, rescaled to ``gate_lr`` if set."""
        if self.cfg.gate_lr is None:
            return main_group["lr"]
        return self.cfg.gate_lr * main_group["lr"] / main_group["initial_lr"]

    @torch.no_grad()
    def gate_step(self, step: int, main_group: dict) -> None:
        """One proximal gradient step on every gate (module docstring)."""
        lr = self.gate_lr(main_group)
        for group in self.gate_optimizer.param_groups:
            group["lr"] = lr
        self.gate_optimizer.step()
        threshold = scheduled_threshold(self.cfg, step, self.total_steps) * (lr if self.cfg.threshold_times_lr else 1.0)
        for gate in self.gates():
            gate.copy_(proximal_map(gate, threshold, self.cfg.proximal))

    def prune(self) -> None:
        for layer in self.layers.values():
            layer.prune()

    def ranks(self) -> dict[str, int]:
        """Nonzero gates per matrix (after :meth:`prune`, the layers' ranks)."""
        return {name: int(layer.gate.count_nonzero()) for name, layer in self.layers.items()}

    def extra_results(self, model: nn.Module) -> dict[str, Any]:
        summary = rank_summary(self.ranks(), self.shapes)
        return {"effective_params": summary.pop("effective_params"), "sora": {"r_max": self.r_max, **summary}}

    def save_artifacts(self, model: nn.Module, run_dir: str) -> None:
        write_rank_pattern(run_dir, self.ranks(), r_max=self.r_max)
        save_gated_adapter(self.layers, str(Path(run_dir) / "adapter.safetensors"))
