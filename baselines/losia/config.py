"""LoSiA's options (LoSiA-Pro takes the same); the readings behind them: :mod:`baselines.losia.method`."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.methods import MethodConfig, option_enum

Taylor = option_enum("Taylor", __name__, "param_mix", "param_first", "param_second")
InitialSubnet = option_enum("InitialSubnet", __name__, "importance", "random")


@dataclass
class LosiaConfig(MethodConfig):
    lr: float = 2e-4  # the official scripts' larger rate (arc_c, boolq; 5e-5 elsewhere): W moves by ~lr a step
    period: int = 50  # T, steps per slot (the code's commonsense scripts; Alpaca 150, default 100)
    taylor: Taylor = Taylor.param_mix  # |s - s^2/2| (code default) | param_first | param_second
    beta1: float = 0.85  # EMA of the sensitivity (code default)
    beta2: float = 0.85  # EMA of its uncertainty (code default)
    rewarm: bool = True  # linear re-warm of a slot's rate over T steps after re-selection
    initial_subnet: InitialSubnet = InitialSubnet.random  # random (the code's) | importance (this harness's option)
    importance_batches: int = 8  # batches for the initial subnet (initial_subnet=importance)
    dense_rest: bool = False  # also train embeddings, norms and biases densely (the code)
    adam_eps: float = 1e-6  # Adam's epsilon in every group (the code's optimizer, transformers' AdamW default)
