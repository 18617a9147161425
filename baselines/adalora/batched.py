"""peft's AdaLoRA per-step work (peft 0.21), the same computation in fewer passes and loops.

What peft does every training step, and what replaces it here (:func:`batch_peft_steps` swaps
the classes of peft's own objects; its parameters, allocator state and rank pattern stay peft's):

1. ``SVDLinear.forward``: ``result += (x (A ⊙ E)ᵀ Bᵀ) · α / (r + 1e-5)`` (docs/papers.md 5.1.1)
   scales the n x d_out update in two passes, and adds it in place into the frozen layer's
   output, a view (``F.linear`` of a 3-D input): autograd then copies that whole output once
   more in backward (``CopySlices``). Under bf16 autocast the division by the one-element
   tensor ``ranknum`` also turns the update into float32, and an input already in bf16 is
   cast to float32 (the factors' dtype) for the product to cast it back. :class:`ScaledSVDLinear`
   multiplies the r x d_in factor A ⊙ E by α / (r + 1e-5) instead, adds the update out of
   place and leaves an input in the autocast dtype as it is: the same function, to float
   rounding (the scale is applied before the products, not after; the skipped casts are exact).
2. ``AdaLoraModel.forward``: the orthogonality regulariser, the mean over factors of
   ``‖PPᵀ − I‖_F`` (A) and ``‖PᵀP − I‖_F`` (B) (5.1.1), in a Python loop over every named
   parameter of the model, four operations per factor. :class:`BatchedAdaLoraModel` stacks the
   factors of one shape and takes one batched product and norm per shape (each factor's
   product and norm are the ones peft computes; their sum is added in another order).
3. ``RankAllocator.update_ipt``: per factor, I = |P ⊙ ∇P| and the EMAs Ī, Ū (5.1.3), ten
   operations each. :class:`BatchedRankAllocator` runs the same element-wise operations, in the
   same order, over all factors at once (``torch._foreach_*``): bit for bit peft's.
4. ``RankAllocator.mask_using_rank_pattern`` (every step after the budget phase): builds each
   λ's mask from the rank pattern's Python lists. Here the masks are built once per pattern.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft import PeftModel
from peft.tuners.adalora import AdaLoraModel, RankAllocator, SVDLinear
from torch import nn
from transformers.integrations import deepspeed_config


class ScaledSVDLinear(SVDLinear):
    """peft's ``SVDLinear`` whose forward scales the factor, not the output (module docstring, 1)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.lora_A.keys():
                continue
            lora_a = self.lora_A[name]
            scale = self.scaling[name] / (self.ranknum[name] + 1e-5)
            if not (torch.is_autocast_enabled(x.device.type) and x.dtype == torch.get_autocast_dtype(x.device.type)):
                x = self._cast_input_dtype(x, lora_a.dtype)  # else a round trip: the product casts x back
            update = self.lora_dropout[name](x) @ (lora_a * self.lora_E[name] * scale).T @ self.lora_B[name].T
            result = result + update.to(result.dtype)
        return result


class BatchedAdaLoraModel(AdaLoraModel):
    """peft's ``AdaLoraModel`` with the orthogonality regulariser batched per factor shape
    (module docstring, 2)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model.forward(*args, **kwargs)
        if isinstance(getattr(outputs, "loss", None), torch.Tensor):
            weight = self.peft_config[self.trainable_adapter_name].orth_reg_weight
            if weight < 0:
                raise ValueError("orth_reg_weight should be greater than or equal to 0. ")
            outputs.loss += weight * self.orthogonality()
        return outputs

    factor_groups: Optional[dict[tuple[bool, torch.Size], list[nn.Parameter]]] = None  # (is A, shape) -> factors

    def orthogonality(self) -> torch.Tensor | float:
        """Mean over the trainable adapter's factors of ``‖PPᵀ − I‖_F`` (A) / ``‖PᵀP − I‖_F`` (B)."""
        if self.factor_groups is None:
            self.factor_groups = {}
            for name, p in self.model.named_parameters():
                if ("lora_A" in name or "lora_B" in name) and self.trainable_adapter_name in name:
                    self.factor_groups.setdefault(("lora_A" in name, p.shape), []).append(p)
        total: torch.Tensor | float = 0
        for (is_a, _), params in self.factor_groups.items():
            stacked = torch.stack(params)
            cov = stacked @ stacked.mT if is_a else stacked.mT @ stacked
            eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
            total = total + torch.linalg.vector_norm(cov - eye, dim=(-2, -1)).sum()
        count = sum(len(params) for params in self.factor_groups.values())
        return total / count if count else 0


class BatchedRankAllocator(RankAllocator):
    """peft's ``RankAllocator`` with the sensitivity update over all factors at once and the
    final masks built once (module docstring, 3-4)."""

    factors: Optional[tuple[nn.Module, list[str], list[nn.Parameter]]] = None  # (model, names, params) of update_ipt
    masks: Optional[tuple[dict[str, list[bool]], list[tuple[nn.Parameter, torch.Tensor]]]] = None  # (pattern, (λ, drop))

    def adapter_factors(self, model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
        """The parameters peft's ``update_ipt`` walks (``lora_*`` of the adapter), named as it names them."""
        if self.factors is None or self.factors[0] is not model:
            named = [(n, p) for n, p in model.named_parameters() if "lora_" in n and self.adapter_name in n]
            self.factors = (model, [n for n, _ in named], [p for _, p in named])
        return self.factors[1], self.factors[2]

    def update_ipt(self, model: nn.Module) -> None:
        if deepspeed_config() is not None:
            return super().update_ipt(model)
        names, params = self.adapter_factors(model)
        for name, p in zip(names, params):
            if name not in self.ipt:
                self.ipt[name], self.exp_avg_ipt[name], self.exp_avg_unc[name] = (torch.zeros_like(p) for _ in range(3))
        with torch.no_grad():
            ipt = torch._foreach_mul(params, [p.grad for p in params])
            torch._foreach_abs_(ipt)
            # Ī ← β1 Ī + (1 − β1) I
            exp_avg_ipt = torch._foreach_add(
                torch._foreach_mul([self.exp_avg_ipt[n] for n in names], self.beta1), torch._foreach_mul(ipt, 1 - self.beta1)
            )
            # Ū ← β2 Ū + (1 − β2) |I − Ī|
            deviation = torch._foreach_sub(ipt, exp_avg_ipt)
            torch._foreach_abs_(deviation)
            exp_avg_unc = torch._foreach_add(
                torch._foreach_mul([self.exp_avg_unc[n] for n in names], self.beta2), torch._foreach_mul(deviation, 1 - self.beta2)
            )
        for name, i, ema, unc in zip(names, ipt, exp_avg_ipt, exp_avg_unc):
            self.ipt[name], self.exp_avg_ipt[name], self.exp_avg_unc[name] = i, ema, unc

    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict[str, list[bool]]) -> None:
        if self.masks is None or self.masks[0] != rank_pattern:
            truncated = self.adapter_name not in next(iter(rank_pattern))
            drops = []
            for name, p in model.named_parameters():
                if f"lora_E.{self.adapter_name}" in name:
                    key = name.replace(f".{self.adapter_name}", "") if truncated else name
                    drops.append((p, ~torch.tensor(rank_pattern[key], dtype=torch.bool, device=p.device).unsqueeze(-1)))
            self.masks = ({k: list(v) for k, v in rank_pattern.items()}, drops)
        with torch.no_grad():
            for p, drop in self.masks[1]:
                p.masked_fill_(drop, 0.0)


def batch_peft_steps(model: PeftModel) -> None:
    """Give peft's AdaLoRA objects in ``model`` the batched per-step work of this module (their
    state is untouched; ``isinstance`` checks against peft's classes still hold)."""
    tuner = model.base_model
    if type(tuner) is not AdaLoraModel or type(tuner.rankallocator) is not RankAllocator:
        raise TypeError(f"batch_peft_steps expects peft's AdaLoraModel and RankAllocator, not {type(tuner).__name__}")
    tuner.__class__ = BatchedAdaLoraModel
    tuner.rankallocator.__class__ = BatchedRankAllocator
    for module in tuner.model.modules():
        if type(module) is SVDLinear:
            module.__class__ = ScaledSVDLinear
