"""SoRA's options; the readings behind them: :mod:`baselines.sora.method`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from experiments.methods import MethodConfig, option_enum

ProximalMap = option_enum("ProximalMap", __name__, "official", "soft")
ThresholdSchedule = option_enum("ThresholdSchedule", __name__, "constant", "linear", "staged")


@dataclass
class SoraConfig(MethodConfig):
    lr: float = 8e-4  # official run_glue_sora_no_schedule.sh
    rank: Optional[int] = None  # r_max; None: the budget's rank K
    alpha: Optional[float] = None  # None: 2 * r_max (official 16 at r_max 8)
    dropout: float = 0.0  # official
    gate_lr: Optional[float] = None  # None: the run's learning rate (official sparse_lr default)
    gate_eps: float = 1e-6  # Adam's epsilon of the gates (official SparseAdamW: transformers' AdamW default)
    l1_weight: float = 10.0  # η, the code's sparse_lambda (no-schedule script)
    threshold: float = 3e-4  # ξ, the code's sparse_lambda_2 (no-schedule script); the end value of a schedule
    threshold_schedule: ThresholdSchedule = ThresholdSchedule.constant  # constant | linear | staged
    threshold_start: float = 0.0  # linear / staged: ξ at the first step (schedule script: 0)
    threshold_stages: int = 7  # staged: number of stages (schedule script: 7)
    threshold_times_lr: bool = False  # ξ_t · lr_t (the code's multiply_lr variant)
    proximal: ProximalMap = ProximalMap.official  # official | soft
