"""AdaLoRA (Zhang et al., ICLR 2023; docs/papers.md 5) through peft's ``AdaLoraConfig``.

Each target matrix gets the SVD-form update ``W = W⁽⁰⁾ + P Λ Q`` (docs/papers.md 5.1.1), scaled
by ``alpha / init_r``. Triplets are scored by the smoothed sensitivity times its uncertainty,
``s = Ī·Ū`` with ``Ī(t) = β1 Ī(t−1) + (1−β1) |w ∂L/∂w|`` and ``Ū(t) = β2 Ū(t−1) + (1−β2)
|I(t) − Ī(t)|`` (docs/papers.md 5.1.3), ``S_i = s(λ_i) + (1/d1) Σ_j s(P_ji) + (1/d2) Σ_j s(Q_ij)``
(5.1.4), and every ``deltaT`` steps only the top-b(t) triplets across all matrices keep their
λ (5.1.5), with the cubic budget schedule (5.1.6; the equation numbers of the paper are not
quoted here because docs/papers.md does not give them):

    b(t) = b(0)                                             t <= t_i
    b(t) = b(T) + (b(0) − b(T)) (1 − (t − t_i) / (T − t_i − t_f))³    t_i < t <= T − t_f
    b(t) = b(T), allocation frozen                           t > T − t_f

Budget ``rK`` means a final *average* rank K: ``target_r = K``, so b(T) = K · (number of
adapted matrices) and the final triplets match LoRA rank K's count up to the one λ per
rank; ``init_r = ceil(1.5 K)`` (b(0) ≈ 1.5 b(T), as in the paper's GLUE set-up and the official
RTE script: init 2, target 1). ``tinit`` and ``tfinal`` are fractions of the run's optimizer
steps T (the official RTE script: 600 and 1800 of 50 epochs x 78 steps = 0.15 and 0.46);
``deltaT`` 1 and α 32 are that script's; β1 = β2 = 0.85 (paper); γ = 0.1 for the orthogonality
regulariser ``R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F`` (5.1.1; peft computes the Frobenius norm,
not squared, averaged over the factors), the most common value of the paper's Table 8.

Readings: the regulariser is added by peft's ``AdaLoraModel.forward`` to ``outputs.loss``,
which is the loss the Trainer minimises and logs, so ``train_loss`` includes it. peft's
``update_and_allocate(step)`` is called after every optimizer step, before the gradients
are cleared, with ``step`` = the number of optimizer steps taken so far (1..T), so the last
step of the budgeting phase (T − t_f) is always reached and freezes the allocation.

Per-step cost: peft's per-step work (the scaled update of every layer, the orthogonality
regulariser, the sensitivity EMAs, the final masks) runs batched, :mod:`baselines.adalora.batched`
(``batched_steps``, default true): the same computation, the allocator's bit for bit, the layer's
and the regulariser's to float rounding (tests/test_step_cost.py compares each with peft's own).

Resuming: the method's state (:meth:`AdaLora.state_dict`) is peft's allocator (the EMAs Ī, Ū
and the last sensitivities of every factor) and the rank pattern (the triplets kept so far,
which masks every step after T − t_f). peft keeps the pattern in its config, and with one set
its ``save_pretrained`` cuts the adapter to the kept ranks: a checkpoint written so could not
be loaded back into the full-size model the optimizer trains (and the masked triplets' factors,
which still train and may return, would be lost). So the method holds the pattern between
steps and hands it to peft only inside ``update_and_allocate`` and after training: every
checkpoint holds the full adapter, the pattern travels in the method's state.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from peft import AdaLoraConfig, PeftModel, get_peft_model
from torch import nn
import torch

from baselines.adalora.batched import batch_peft_steps
from baselines.rank_pattern import matrix_shapes, rank_summary, write_rank_pattern
from experiments.methods import Method, MethodConfig, PrepareContext, register_method


@dataclass
class AdaLoraMethodConfig(MethodConfig):
    lr: float = 1e-3  # official MRPC script, and the paper's QA rate
    target_r: Optional[int] = None  # final average rank; None: the budget's rank K
    init_r: Optional[int] = None  # None: ceil(init_r_factor * target_r)
    init_r_factor: float = 1.5  # b(0) / b(T), paper's GLUE set-up
    alpha: float = 32.0  # official RTE / MRPC scripts
    dropout: float = 0.0
    tinit: float = 0.15  # fraction of the optimizer steps at the initial budget (RTE script 600 / 3900)
    tfinal: float = 0.45  # fraction at the frozen final allocation (RTE script 1800 / 3900)
    deltaT: int = 1  # steps between two allocations (RTE / MRPC scripts)
    beta1: float = 0.85  # EMA of the sensitivity (paper)
    beta2: float = 0.85  # EMA of its uncertainty (paper)
    orth_reg_weight: float = 0.1  # γ (paper's Table 8, most tasks)
    batched_steps: bool = True  # peft's per-step work batched (baselines/adalora/batched.py); false: peft's own loops


# peft's RankAllocator attributes a resumed run needs: per factor, the last sensitivity I and
# the EMAs Ī, Ū (docs/papers.md 5.1.3)
ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")

# the model's head -> peft's task type (peft has none for multiple choice: its base PeftModel
# passes the inputs through, as for LoRA)
PEFT_TASK_TYPES = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "multiple_choice": None}


def schedule_steps(total: int, tinit: float, tfinal: float) -> dict[str, int]:
    """tinit / tfinal as step counts (round(fraction * T)), kept feasible for peft on short runs:
    at least one warm-up step, so the sensitivities exist before the first allocation (peft
    only updates them on steps < T - tfinal), and at least one budget-decreasing step."""
    if total < 2:
        raise ValueError(f"AdaLoRA needs at least 2 optimizer steps to allocate ranks; this run has {total}")
    warmup = min(max(1, round(tinit * total)), total - 1)
    return {"tinit": warmup, "tfinal": max(0, min(round(tfinal * total), total - warmup - 1))}


@register_method("adalora", AdaLoraMethodConfig)
class AdaLora(Method):
    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.model: Optional[PeftModel] = None
        self.shapes: dict[str, tuple[int, int]] = {}
        self.rank_pattern: Optional[dict[str, list[bool]]] = None  # held here between steps (module docstring)

    def peft_config(self, ctx: PrepareContext) -> AdaLoraConfig:
        """The budget, ranks and schedule in peft's terms (steps, not fractions)."""
        total = ctx.require_total_steps(self.name)
        target_r = self.cfg.target_r or ctx.budget_rank
        return AdaLoraConfig(
            task_type=PEFT_TASK_TYPES[ctx.head_type],
            target_r=target_r,
            init_r=self.cfg.init_r or math.ceil(self.cfg.init_r_factor * target_r),
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            **schedule_steps(total, self.cfg.tinit, self.cfg.tfinal),
            deltaT=self.cfg.deltaT,
            beta1=self.cfg.beta1,
            beta2=self.cfg.beta2,
            orth_reg_weight=self.cfg.orth_reg_weight,
            total_step=total,
            target_modules=ctx.target_modules,
            modules_to_save=ctx.head_modules,
        )

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        self.shapes = matrix_shapes(model, ctx.target_modules)
        self.model = get_peft_model(model, self.peft_config(ctx))
        if self.cfg.batched_steps:
            batch_peft_steps(self.model)
        return self.model

    @property
    def peft_settings(self) -> AdaLoraConfig:
        return self.model.peft_config["default"]

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """peft's required per-step call, after ``optimizer.step()`` and before ``zero_grad()``,
        with the rank pattern in peft's config for the call only (module docstring)."""
        config = self.peft_settings
        config.rank_pattern = self.rank_pattern
        self.model.base_model.update_and_allocate(step)
        self.rank_pattern, config.rank_pattern = config.rank_pattern, None

    def on_train_end(self) -> None:
        """The final rank pattern back in peft's config (the saved adapter is cut to it)."""
        self.peft_settings.rank_pattern = self.rank_pattern

    def state_dict(self) -> dict[str, Any]:
        """peft's allocator EMAs (by parameter name) and the rank pattern kept so far."""
        allocator = self.model.base_model.rankallocator
        return {
            "rank_pattern": self.rank_pattern,
            **{key: getattr(allocator, key) for key in ALLOCATOR_STATE},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rank_pattern = state["rank_pattern"]
        allocator = self.model.base_model.rankallocator
        for key in ALLOCATOR_STATE:
            setattr(allocator, key, dict(state[key]))

    def final_ranks(self) -> dict[str, int]:
        """Kept triplets per matrix, from peft's rank pattern (keys ``<module>.lora_E[.adapter]``)."""
        config = self.peft_settings
        if config.rank_pattern is None:
            raise RuntimeError("AdaLoRA has no rank pattern yet: update_and_allocate never reached T - tfinal")
        return {name.split(".lora_E")[0]: int(sum(mask)) for name, mask in config.rank_pattern.items()}

    def extra_results(self, model: nn.Module) -> dict[str, Any]:
        config = self.peft_settings
        summary = rank_summary(self.final_ranks(), self.shapes)
        schedule = {k: getattr(config, k) for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step")}
        return {"effective_params": summary.pop("effective_params"), "adalora": {**schedule, **summary}}

    def save_artifacts(self, model: nn.Module, run_dir: str) -> None:
        ranks = self.final_ranks()
        config = self.peft_settings
        write_rank_pattern(run_dir, ranks, init_r=config.init_r, target_r=config.target_r)
        with warnings.catch_warnings():
            # a matrix pruned to rank 0 has zero-sized factors, which peft takes for unsharded ZeRO-3 tensors
            warnings.filterwarnings("ignore", message=".*have invalid shape.*")
            self.model.save_pretrained(str(Path(run_dir) / "adapter"))  # peft cuts the factors to the final ranks
