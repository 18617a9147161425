"""LoRA (Hu et al., 2021) through peft: W x + (alpha / r) B A x on every target module.

``budget=rK`` sets the rank r = K, so the adapter has exactly K * sum(d_in + d_out)
parameters (docs/papers.md 8.1); the task head trains in full and is counted apart. ``alpha``
defaults to 2 r (scaling 2 at every rank, so changing the budget does not change the
effective step size); set ``method.alpha`` for a fixed alpha as in the AdaLoRA/SoRA tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from peft import LoraConfig, get_peft_model
from torch import nn

from experiments.methods import Method, MethodConfig, PrepareContext, register_method


@dataclass
class LoraMethodConfig(MethodConfig):
    lr: float = 5e-4
    rank: Optional[int] = None  # None: the budget's rank
    alpha: Optional[float] = None  # None: 2 * rank
    dropout: float = 0.0


@register_method("lora", LoraMethodConfig)
class Lora(Method):
    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        rank = self.cfg.rank or ctx.budget_rank
        config = LoraConfig(
            r=rank,
            lora_alpha=self.cfg.alpha if self.cfg.alpha is not None else 2 * rank,
            lora_dropout=self.cfg.dropout,
            target_modules=ctx.target_modules,
            modules_to_save=ctx.head_modules or None,  # a causal LM has no new head
        )
        return get_peft_model(model, config)
