"""Zero-shot reference: no training, the model evaluated as loaded.

For an encoder this is the untrained (randomly initialised) task head on the pretrained
backbone: the chance level a fine-tuned row must beat. For a causal LM it is the real
zero-shot score of the pretrained model (choices scored by log-likelihood, in the task's
``task.prompt_format``). ``Method.trains = False``: the runner reads no training split,
builds no optimizer and skips ``Trainer.train``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from experiments.methods import Method, MethodConfig, PrepareContext, register_method


@dataclass
class ZeroShotConfig(MethodConfig):
    lr: float = 0.0  # nothing trains


@register_method("zero_shot", ZeroShotConfig)
class ZeroShot(Method):
    trains = False
    uses_budget = False

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        return model
