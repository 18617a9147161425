"""The method interface: a method registered from outside the two method packages, options
checked at composition, the method-layer marker."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from torch import nn

from experiments import methods, registry
from experiments.adaptation import MethodLayer
from experiments.config import compose
from experiments.runner import run, save_model

TOY = '''
from dataclasses import dataclass

from experiments.methods import Method, MethodConfig, PrepareContext, freeze_all_but, register_method


@dataclass
class ToyConfig(MethodConfig):
    lr: float = 1e-3


@register_method("toy", ToyConfig)
class Toy(Method):
    """Trains the task head only."""

    def prepare(self, model, ctx: PrepareContext):
        freeze_all_but(model, ctx.head_modules)
        return model
'''


def test_a_method_from_outside_is_one_folder_and_one_registry_line(tmp_path: Path, make_cfg, monkeypatch) -> None:
    folder = tmp_path / "plugins" / "toy_method"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(folder.parent))
    monkeypatch.setattr(methods, "METHODS", dict(methods.load_methods()))  # the toy's registration ends with the test
    monkeypatch.setattr(registry, "METHOD_MODULES", [*registry.METHOD_MODULES, "toy_method"])
    try:
        cfg = make_cfg("method=toy")
        assert cfg.method.name == "toy" and cfg.method.lr == 1e-3
        results = json.loads(run(cfg, tmp_path / "run").read_text())
    finally:
        sys.modules.pop("toy_method", None)
    assert results["status"] == "completed" and results["method"] == "toy"
    assert results["trainable_params"] == 0 and results["head_params"] > 0  # the toy trained its head only


@pytest.mark.parametrize(
    "override, valid",
    [
        ("method.scope=globl", "per_matrix, global"),
        ("method.granularity=row", "rows+cols, rows, cols"),
        ("method.importance=grads", "grad_x_weight, grad, weight, random"),
    ],
)
def test_a_wrong_option_fails_at_composition_with_the_valid_names(override: str, valid: str) -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose(["method=taso", override])
    assert f"expected one of [{valid}]" in str(error.value.__cause__)


@pytest.mark.slow  # a run.py process (~10 s, its imports); the refusal is unit-tested in-process above
def test_run_py_refuses_a_wrong_option_before_loading_a_model(tmp_path: Path, cli) -> None:
    result = cli("method.scope=globl", "model=tiny", "logger=none", f"paths.runs={tmp_path}", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "expected one of [per_matrix, global]" in result.stderr
    assert not any(tmp_path.iterdir())  # no run folder: nothing ran


def test_save_model_refuses_a_method_layer_from_anywhere(tmp_path: Path) -> None:
    """``trainer.save_model`` recognises a method's layer by the marker class, not by its module."""

    class OutsideLayer(MethodLayer):
        pass

    with pytest.raises(ValueError, match=r"\['OutsideLayer'\]"):
        save_model(nn.Sequential(nn.Linear(2, 2), OutsideLayer()), None, tmp_path)
