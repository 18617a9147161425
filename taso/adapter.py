"""Model-level handling of TASO adapters: injection, merge / unmerge, and safetensors I/O.

An adapter file holds, per adapted matrix, ``<name>.lora_A``, ``<name>.lora_B``,
``<name>.rows`` and ``<name>.cols`` (the index sets), plus rank and alpha in the metadata:
loading needs the pretrained model and this file only, never pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from experiments.adaptation import replace_linears
from taso.layer import SparseLoraLinear
from taso.selection import CoreRegion


def inject(model: nn.Module, index_sets: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float) -> None:
    """Replace each named ``nn.Linear`` by a :class:`SparseLoraLinear` on its (rows, cols)."""
    replace_linears(model, index_sets, lambda name, base: SparseLoraLinear(base, *index_sets[name], rank, alpha))


def sparse_layers(model: nn.Module) -> dict[str, SparseLoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLoraLinear)}


def merge(model: nn.Module) -> None:
    for layer in sparse_layers(model).values():
        layer.merge()


def replace_by_base(model: nn.Module) -> None:
    """Put each adapted layer's base ``nn.Linear`` back in its place (after :func:`merge`,
    the model is then a plain transformers model with the update in its weights)."""
    for name, layer in sparse_layers(model).items():
        model.set_submodule(name, layer.base)


def unmerge(model: nn.Module) -> None:
    for layer in sparse_layers(model).values():
        layer.unmerge()


def save_adapter(model: nn.Module, path: Path) -> None:
    layers = sparse_layers(model)
    if not layers:
        raise ValueError("the model has no TASO adapter to save")
    tensors = {}
    for name, layer in layers.items():
        tensors.update(
            {
                f"{name}.lora_A": layer.lora_A.detach().cpu().contiguous(),
                f"{name}.lora_B": layer.lora_B.detach().cpu().contiguous(),
                f"{name}.rows": layer.rows.cpu(),
                f"{name}.cols": layer.cols.cpu(),
            }
        )
    first = next(iter(layers.values()))
    meta = {"rank": str(first.rank), "alpha": str(first.scaling * first.rank), "layers": json.dumps(sorted(layers))}
    save_file(tensors, str(path), metadata=meta)


def load_adapter(model: nn.Module, path: Path) -> nn.Module:
    """Inject the adapters stored in ``path`` into a pretrained model and load their weights."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(path))
    names = json.loads(meta["layers"])
    inject(model, {n: (tensors[f"{n}.rows"], tensors[f"{n}.cols"]) for n in names}, int(meta["rank"]), float(meta["alpha"]))
    with torch.no_grad():
        for name, layer in sparse_layers(model).items():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
    return model


def save_core_regions(regions: dict[str, CoreRegion], importances: dict[str, torch.Tensor] | None, path: Path) -> None:
    """The core-region map: selected indices and the row / column scores of every matrix."""
    tensors = {}
    for name, region in regions.items():
        tensors.update(
            {
                f"{name}.rows": region.rows,
                f"{name}.cols": region.cols,
                f"{name}.row_scores": region.row_scores.float(),
                f"{name}.col_scores": region.col_scores.float(),
            }
        )
    for name, importance in (importances or {}).items():
        tensors[f"{name}.importance"] = importance.half()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
