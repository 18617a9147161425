"""BitFit (Ben Zaken et al., ACL 2022; docs/papers.md 6): only bias terms and the task head train.

``biases`` selects which biases: ``all`` (default, the paper's main setting) or a list of
name fragments (e.g. ``[query, intermediate]``, the paper's small subset). The trainable
count is fixed by the model, not by the budget: results.json records it (as
``trainable_params`` and as ``effective_params``, the figure the adaptive-rank baselines
also report) and the tables show it in its own budget column. Default learning rate 1e-3, the official code's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from experiments.budget import count_params
from experiments.methods import Method, MethodConfig, PrepareContext, freeze_all_but, register_method


@dataclass
class BitFitConfig(MethodConfig):
    lr: float = 1e-3
    biases: list[str] = field(default_factory=lambda: ["all"])


@register_method("bitfit", BitFitConfig)
class BitFit(Method):
    uses_budget = False

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.effective_params = 0

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        freeze_all_but(model, ctx.head_modules)
        fragments = list(self.cfg.biases)
        selected = 0
        for name, param in model.named_parameters():
            if name.endswith("bias") and ("all" in fragments or any(f in name for f in fragments)):
                param.requires_grad_(True)
                selected += 1
        if not selected:
            raise ValueError(f"BitFit: no bias matches method.biases={fragments}; the model has no such bias terms")
        self.effective_params = count_params(model, ctx.head_modules)["trainable_params"]  # the biases outside the head
        return model

    def extra_results(self, model: nn.Module) -> dict[str, Any]:
        return {"effective_params": self.effective_params}
