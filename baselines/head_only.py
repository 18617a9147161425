"""Head-only reference (linear probe): the backbone stays frozen, only the new task head
(``model.head_modules``) trains. What a PEFT method adds over it is what adapting the
backbone buys. A causal LM has no new head (its LM head is pretrained): refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from experiments.methods import Method, MethodConfig, PrepareContext, freeze_all_but, register_method


@dataclass
class HeadOnlyConfig(MethodConfig):
    lr: float = 1e-3  # a frozen backbone's head tolerates a larger step than backbone tuning (BitFit's rate)


@register_method("head_only", HeadOnlyConfig)
class HeadOnly(Method):
    uses_budget = False

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        if not ctx.head_modules:
            raise ValueError("head_only trains the task head, and this model has none (model.head_modules is empty: a causal LM)")
        freeze_all_but(model, ctx.head_modules)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"head_only: no module of the model matches model.head_modules={list(ctx.head_modules)}")
        return model
