"""The studies in conf/experiment compose, and sweep what the Makefile and docs say they do."""

from __future__ import annotations

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from experiments.config import CONF_DIR, register_configs
from experiments.methods import load_methods

STUDIES = sorted(str(p.relative_to(CONF_DIR / "experiment").with_suffix("")) for p in (CONF_DIR / "experiment").rglob("*.yaml"))


def study(name: str):  # noqa: ANN201
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name="config", overrides=[f"experiment={name}"], return_hydra_config=True)


def grid(cfg) -> dict[str, list[str]]:  # noqa: ANN001
    return {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_composes_on_minilm(name: str) -> None:
    cfg = study(name)
    assert cfg.model.name == "minilm" and cfg.logger.name == "none" and grid(cfg)["seed"]


def test_the_reproduction_runs_every_registered_method() -> None:
    full, quick = grid(study("reproduce")), grid(study("reproduce_quick"))
    assert set(full["method"]) == set(load_methods()) and full["task"] == ["rte", "mrpc", "cola", "stsb"]
    assert full["seed"] == ["0", "1", "2"] and quick["seed"] == ["0"] and study("reproduce_quick").task.max_train_samples == 512


def test_the_taso_ablation_parts() -> None:
    parts = {name.split("/")[1]: grid(study(name)) for name in STUDIES if name.startswith("taso_ablation/")}
    assert parts["scope_gamma"]["method.scope"] == ["per_matrix", "global"] and parts["scope_gamma"]["method.lr_gamma"] == ["0", "0.5", "1"]
    assert parts["rank"]["method.rank"] == ["4", "16"] and parts["importance"]["method.importance"] == ["random"]
    assert all(p["task"] == ["rte", "mrpc"] for p in parts.values()) and set(parts) == {"lora", "scope_gamma", "rank", "importance"}
