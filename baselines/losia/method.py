"""``method=losia`` and ``method=losia_pro``: Low-Resources Subnet Integration Adaptation
(Wang et al., EMNLP 2025; docs/papers.md 2), on the layers of :mod:`baselines.losia.layer`.

Every target matrix trains one dense sub-block W[R, C] of int(p d_out) x int(p d_in)
entries in place (high-rank, no adapter). The rank factor p is computed from the budget:
sum_m |R_m| |C_m| = budget (``budget=rK``: K sum_m (d_in + d_out)), p = 1/16 on MiniLM at
r1 (:func:`baselines.losia.layer.subnet_shapes`). Asynchronous re-localisation (docs/papers.md 2.2 (9)):
the target matrices of transformer block i share slot i of N; at optimizer step s the slot
(s // T) mod N records the sensitivity score at every step, and at the end of its slot
((s + 1) mod T = 0) each of its matrices writes its block back into the weight, picks the new
rows and columns greedily from the score (docs/papers.md 2.2 (8)), and starts from zeroed AdamW
moments (step counter kept, as the official code does). The slot's learning rate is then
re-warmed (docs/papers.md 2.2 (10)): for the T steps after a re-selection at t_r, the scheduled
rate is multiplied by (t - t_r + 1) / T. The output layer (the task head) is not managed: it
trains densely, the code's default ``output_dim_factor = 0``.

LoSiA-Pro (docs/papers.md 2.2 (11)) computes the block gradient g[..., R]^T x[..., C] directly
and forms the full weight gradient only for the slot that records; the updates are LoSiA's.

Readings where the paper and code are silent or do not fit this harness (each an option):

- ``initial_subnet``: the code starts from random rows and columns until a layer's first
  re-selection, i.e. after (i + 1) T steps for block i (default ``random``, the code's) — on a
  3-epoch RTE run with MiniLM (234 steps, N T = 300) half the blocks would never leave their
  random subnet. This harness's option ``importance`` localises the first subnet from
  |W ⊙ ∂L/∂W| on the frozen model over ``importance_batches`` batches
  (:func:`experiments.adaptation.sensitivity`).
- ``adam_eps`` 1e-6: the code's optimizer is transformers' AdamW with its default epsilon
  (the harness's AdamW uses 1e-8); every LoSiA group carries it.
- ``dense_rest``: the code trains every non-managed parameter (embeddings, norms, biases)
  densely; default false freezes them so the trainable count is the budget (docs/papers.md 2.5).
- The re-warm factor starts at 1 / T on the first step after a re-selection (a factor 0 would
  waste that step); it multiplies the Trainer's schedule (linear warm-up and decay here)
  instead of restarting the code's cosine schedule.
- Gradient clipping acts on the block gradients (the code's per-layer hooks make its clip a
  no-op); with gradient accumulation the score is updated once per micro-batch.
- The slot of a matrix is the first integer in its module name (the transformer block).

Resuming: the subnets (the ``rows`` / ``cols`` buffers), the blocks and the weights with their
holes are in the model's checkpoint, the zeroed moments in the optimizer's; the schedule state
is the method's (:meth:`Losia.state_dict`): each matrix's running record Ī, Ū of the slot that
records, the re-warm starts and the re-selections so far.
"""

from __future__ import annotations

import re
import time
from typing import Any, ClassVar

import torch
from torch import nn

from baselines.losia.config import InitialSubnet, LosiaConfig
from baselines.losia.layer import SubnetLinear, localize, subnet_shapes
from experiments.adaptation import check_budget, replace_linears, sensitivity, target_linears
from experiments.methods import Method, PrepareContext, freeze_all_but, register_method


def block_index(name: str) -> int:
    """The transformer block a module belongs to: the first integer in its dotted name."""
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    if found is None:
        raise ValueError(f"LoSiA: cannot tell which transformer block {name!r} belongs to")
    return int(found.group(1))


@register_method("losia", LosiaConfig)
class Losia(Method):
    """LoSiA: the full weight gradient G is formed for every managed matrix, G[R, C] trains."""

    pro: ClassVar[bool] = False
    writes_frozen_weights: ClassVar[bool] = True  # each re-selection writes a block back and cuts another

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        if cfg.period < 1:
            raise ValueError("method.period must be at least 1")
        self.layers: dict[str, SubnetLinear] = {}
        self.slots: dict[str, int] = {}  # matrix name -> slot id 0..N-1
        self.rewarm_from: dict[int, int] = {}  # slot -> first step after its latest re-selection
        self.relocalizations: list[tuple[int, int]] = []  # (step, slot)
        self.rank_factor = 0.0
        self.importance_time_s = 0.0

    @property
    def n_slots(self) -> int:
        return len(set(self.slots.values()))

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        targets = target_linears(model, ctx.target_modules)
        model.to(ctx.device)
        self.rank_factor, shapes = subnet_shapes({n: (m.out_features, m.in_features) for n, m in targets.items()}, ctx.budget_params)
        start = time.perf_counter()
        subnets = self._initial_subnets(model, targets, shapes, ctx)
        self.importance_time_s = time.perf_counter() - start
        if self.cfg.dense_rest:
            for p in model.parameters():
                p.requires_grad_(True)
        else:
            freeze_all_but(model, ctx.head_modules)
        blocks = sorted({block_index(n) for n in targets})
        betas = (self.cfg.beta1, self.cfg.beta2)
        self.layers = replace_linears(model, subnets, lambda name, base: SubnetLinear(base, *subnets[name], self.cfg.taylor, betas))
        for name, layer in self.layers.items():
            layer.full_gradient = not self.pro
            self.slots[name] = blocks.index(block_index(name))
        check_budget(sum(layer.block.numel() for layer in self.layers.values()), ctx.budget_params, "LoSiA")
        return model

    def _initial_subnets(
        self, model: nn.Module, targets: dict[str, nn.Linear], shapes: dict[str, tuple[int, int]], ctx: PrepareContext
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.cfg.initial_subnet == InitialSubnet.random:
            gen = torch.Generator().manual_seed(ctx.seed)
            return {
                n: (torch.randperm(m.out_features, generator=gen)[: shapes[n][0]].sort().values,
                    torch.randperm(m.in_features, generator=gen)[: shapes[n][1]].sort().values)
                for n, m in targets.items()
            }
        count = self.cfg.importance_batches
        scores, _ = sensitivity(
            model, {n: m.weight for n, m in targets.items()}, lambda: ctx.train_batches(sorted_prefix=count), count,
            ctx.device, desc="LoSiA initial subnet",
        )
        return {n: localize(scores[n], *shapes[n]) for n in targets}

    def slot_params(self) -> dict[int, list[nn.Parameter]]:
        groups: dict[int, list[nn.Parameter]] = {}
        for name, layer in self.layers.items():
            groups.setdefault(self.slots[name], []).append(layer.block)
        return groups

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """One group per slot (its rate is re-warmed on its own), then the head (and the dense
        rest with ``dense_rest``)."""
        common = {"lr": lr, "weight_decay": weight_decay, "eps": self.cfg.adam_eps}
        groups = [{"params": ps, **common, "losia_slot": s} for s, ps in sorted(self.slot_params().items())]
        block_ids = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in block_ids]
        return groups + [{"params": rest, **common}]

    def recording_slot(self, step: int) -> int:
        """The slot that records the sensitivity during optimizer step ``step`` (0-based)."""
        return (step // self.cfg.period) % self.n_slots

    def begin_step(self, step: int) -> None:
        """Arm the recording slot; LoSiA-Pro forms full gradients for that slot only."""
        recording = self.recording_slot(step)
        for name, layer in self.layers.items():
            layer.recording = self.slots[name] == recording
            layer.full_gradient = layer.recording or not self.pro

    def rewarm(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Scale each re-warming slot's scheduled rate by (step - t_r + 1) / T."""
        if not self.cfg.rewarm:
            return
        for group in optimizer.param_groups:
            start = self.rewarm_from.get(group.get("losia_slot", -1))
            if start is not None and step - start < self.cfg.period:
                group["lr"] *= (step - start + 1) / self.cfg.period

    def end_step(self, steps_done: int, optimizer: torch.optim.Optimizer) -> None:
        """At the end of a slot: re-select its subnets and zero their AdamW moments."""
        if steps_done % self.cfg.period:
            return
        slot = self.recording_slot(steps_done - 1)
        for name, layer in self.layers.items():
            if self.slots[name] == slot and layer.relocalize():
                state = optimizer.state.get(layer.block, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key].zero_()
        self.rewarm_from[slot] = steps_done
        self.relocalizations.append((steps_done, slot))

    def on_step_begin(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Arm the recording slot and re-warm the slots' scheduled rates for this step."""
        self.begin_step(step - 1)
        self.rewarm(step - 1, optimizer)

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Re-localise the slot that ends with this step."""
        self.end_step(step, optimizer)

    def state_dict(self) -> dict[str, Any]:
        """The sensitivity records (Ī, Ū) of the matrices that have one, the re-warm starts and
        the re-selections so far."""
        return {
            "records": {n: (layer.mean_sens, layer.uncertainty) for n, layer in self.layers.items() if layer.mean_sens is not None},
            "rewarm_from": self.rewarm_from,
            "relocalizations": self.relocalizations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, layer in self.layers.items():
            layer.mean_sens, layer.uncertainty = state["records"].get(name, (None, None))
        self.rewarm_from = dict(state["rewarm_from"])
        self.relocalizations = [tuple(r) for r in state["relocalizations"]]

    def extra_results(self, model: nn.Module) -> dict[str, Any]:
        return {
            "importance_time_s": self.importance_time_s,
            "losia": {
                "pro": self.pro,
                "rank_factor": self.rank_factor,
                "period": self.cfg.period,
                "slots": self.n_slots,
                "relocalizations": len(self.relocalizations),
                "initial_subnet": self.cfg.initial_subnet,
            }
        }
