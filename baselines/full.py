"""Full fine-tuning: every weight of the backbone and the head trains.

Default learning rate 2e-5, the usual full fine-tuning rate for base-size encoders on GLUE
(docs/papers.md section 7: LoSiA uses 2e-5, SoRA 5e-5).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from experiments.methods import Method, MethodConfig, PrepareContext, register_method


@dataclass
class FullConfig(MethodConfig):
    lr: float = 2e-5


@register_method("full", FullConfig)
class FullFineTuning(Method):
    uses_budget = False

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
