"""Config composition: every option of every group composes; mistakes fail clearly."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError

from experiments.config import CONF_DIR, compose

GROUPS = ("method", "task", "budget", "model", "trainer", "logger", "data")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    node = cfg[group]
    if group in ("method", "task", "budget", "model", "logger"):
        assert node.name == option


def test_default_experiment() -> None:
    cfg = compose()
    assert (cfg.task.name, cfg.budget.name, cfg.model.name, cfg.logger.mode) == ("rte", "r1", "minilm", "offline")


def test_budget_ranks() -> None:
    assert [compose([f"budget=r{k}"]).budget.rank for k in (1, 2, 4, 8, 16)] == [1, 2, 4, 8, 16]


@pytest.mark.parametrize(
    "override",
    [
        "trainer.lr_rate=1e-3", "method.rnk=4", "task.labelz=[a]", "model.target=[x]",
        # the nested task blocks are typed too
        "task.tsv.headr=false", "task.mc_columns.labl=answer", "task.instruction.choiceword=Answer", "task.lm_eval.txt=Q",
    ],
)
def test_typo_in_a_key_fails(override: str) -> None:
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as info:
        compose([override])
    assert override.split("=")[0].split(".")[-1] in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize(
    "group,valid",
    [("method", ["full", "lora", "taso"]), ("task", ["mrpc", "rte"]), ("model", ["minilm", "tiny"]), ("budget", ["r1", "r8"])],
)
def test_unknown_choice_lists_valid_ones(group: str, valid: list[str]) -> None:
    with pytest.raises(MissingConfigException) as info:
        compose([f"{group}=nonexistent"])
    offered = str(info.value).split("Available options")[1].split("Config search path")[0].split()
    assert set(valid) <= set(offered) and not any("schema" in o for o in offered), offered


@pytest.mark.parametrize("override", ["trainer.batch_size=many", "task.tsv.header=maybe", "task.lm_eval.clean=wikihw"])
def test_wrong_type_fails(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        compose([override])
