"""``method=losia_pro``: LoSiA-Pro (Wang et al., EMNLP 2025), LoSiA with the block gradient
g[..., R]^T x[..., C] formed straight from the sliced activations; the full weight gradient
only for the slot that records. The updates are LoSiA's (:mod:`baselines.losia.method`)."""

from __future__ import annotations

from typing import ClassVar

from baselines.losia.config import LosiaConfig
from baselines.losia.method import Losia
from experiments.methods import register_method


@register_method("losia_pro", LosiaConfig)
class LosiaPro(Losia):
    """LoSiA-Pro: the block gradient straight from the sliced activations (same updates)."""

    pro: ClassVar[bool] = True
