"""The one interface every PEFT method implements, and the registry ``method=<name>`` selects.

Adding a method is one folder (or module), anywhere importable, that defines a typed options
dataclass (each default written there, with a one-line comment) and a :class:`Method` subclass
decorated with :func:`register_method`, plus one line naming its module in
:mod:`experiments.registry`; ``method=<name>`` then selects it (``--cfg job`` shows its options).
A method that keeps a state of its own during training (schedule positions, EMAs, its own
optimizer, allocations) returns it from :meth:`Method.state_dict` and takes it back in
:meth:`Method.load_state_dict`: a resumed run then continues exactly (tests/test_resume.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
from hydra.core.config_store import ConfigStore
from peft import PeftModel
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from experiments.adaptation import matches
from experiments.storage import atomic_write


def option_enum(name: str, module: str, *values: str) -> type[StrEnum]:
    """The valid values of an enumerated method option, as a ``StrEnum`` whose member names are
    the values (so ``rows+cols`` and ``global`` are possible): a config field typed with it
    fails at composition with the valid names, and a member compares equal to its string."""
    return StrEnum(name, {v: v for v in values}, module=module)


@dataclass
class MethodConfig:
    """Options common to all methods; each method extends it with its own fields."""

    name: str = ""
    lr: float = 5e-4  # the method's default learning rate (trainer.lr overrides it)


@dataclass
class PrepareContext:
    """What a method may look at while turning the pretrained model into a trainable one."""

    target_modules: list[str]
    head_modules: list[str]
    budget_rank: int
    budget_params: int  # LoRA rank-``budget_rank`` count on the target modules
    train_batches: Callable[..., Iterable[dict[str, torch.Tensor]]]  # fresh iterator per call; (sorted_prefix=n):
    # its first n batches sorted by length among themselves (experiments.runner.batch_source)
    head_type: str  # the model's head (experiments.models.head_type): "seq_cls" | "multiple_choice" | "causal_lm"
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    total_steps: Optional[int] = None  # optimizer steps the run will take (training.planned_optimizer_steps)
    collate: Optional[Callable[[list[dict]], dict[str, torch.Tensor]]] = None  # the harness's batch collator (padding)

    def require_total_steps(self, method_name: str) -> int:
        """The run's optimizer-step count, for methods that schedule over it (AdaLoRA, SoRA)."""
        if self.total_steps is None:
            raise ValueError(
                f"method {method_name!r} schedules over the run's optimizer steps, but PrepareContext.total_steps "
                "is None: build the context with experiments.runner.prepare_context, or pass total_steps="
                "experiments.training.planned_optimizer_steps(cfg, len(train_dataset))"
            )
        return self.total_steps


class Method:
    """Base class: a method adapts a model, may shape the optimizer and may hook the loop."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # False: the method trains nothing (method=zero_shot): the runner reads no training split,
    # builds no optimizer, skips Trainer.train and evaluates the model as prepared
    trains: ClassVar[bool] = True
    # True: the method writes into weights it does not train (LoSiA moves its subnets' holes,
    # TsqLoRA folds the update of a unit that moves), so a checkpoint keeps the whole model;
    # False: only what trains and the buffers (experiments.training.checkpoint_keys), the
    # frozen rest being the pretrained weights
    writes_frozen_weights: ClassVar[bool] = False
    # False: what trains is fixed by the method and the model (BitFit's biases, every weight,
    # the head, nothing), not by ``budget=``: its runs at two budgets train the same weights, and
    # tables name its row without one (:func:`budgeted`)
    uses_budget: ClassVar[bool] = True

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def prepare(self, model: nn.Module, ctx: PrepareContext) -> nn.Module:
        """Freeze / wrap / inject; return the model to train."""
        raise NotImplementedError

    def select_train_data(self, dataset: Any, ctx: PrepareContext) -> Any:
        """The training examples to train on, called after :meth:`prepare` and before the
        Trainer is built (data selection, e.g. TsqLoRA's quality-aware sampling); the default
        keeps every example."""
        return dataset

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups; the default trains every parameter left trainable."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    # Per-step hooks, called by the harness's one callback (:class:`MethodHooks`). ``step`` is
    # the 1-based number of the optimizer step a hook belongs to, the same in every hook of that
    # step: the k-th optimizer step of the run is ``step == k`` (``Trainer.state.global_step``
    # once it is done) and the last one is ``PrepareContext.total_steps``.

    def on_step_begin(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Before the forward passes of optimizer step ``step`` (the scheduled rates are set)."""

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Right after ``optimizer.step()`` of step ``step``: the (clipped) gradients are still
        there; the scheduler has not stepped and the gradients are not cleared yet."""

    def on_train_end(self) -> None:
        """Once, after the last optimizer step, before the evaluation."""

    def state_dict(self) -> dict[str, Any]:
        """The method's state that neither the model's checkpoint (its parameters and persistent
        buffers; a peft model's: the adapter's) nor the Trainer's (optimizer, scheduler, RNG,
        step) holds: schedule positions, EMAs, its own optimizer, allocations. Saved into every
        checkpoint (:class:`MethodHooks`), restored by :meth:`load_state_dict` when a run
        resumes, so that it continues exactly as the uninterrupted run. Tensors, dicts, lists,
        tuples and plain values only (``torch.load(weights_only=True)`` reads it back). The
        default: no state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, on the method as :meth:`prepare` and
        :meth:`select_train_data` left it, before the Trainer loads the checkpoint's weights and
        optimizer and continues training. The default (no state) refuses a non-empty one."""
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, but the checkpoint holds {sorted(state)}")

    def extra_results(self, model: nn.Module) -> dict[str, Any]:
        """Method-specific figures recorded in results.json (e.g. importance time)."""
        return {}

    def save_artifacts(self, model: nn.Module, run_dir: str) -> None:
        """Write method-specific files (adapters, masks) into the run directory."""

    def merged_model(self, model: nn.Module) -> nn.Module:
        """The trained model as a plain transformers model, the method's weights folded in
        (for ``trainer.save_model``; called once, after training; may modify ``model``).
        The default merges peft adapters and returns any other model unchanged."""
        return model.merge_and_unload() if isinstance(model, PeftModel) else model


METHOD_STATE = "method_state.pt"  # Method.state_dict, in every checkpoint folder


def save_method_state(method: Method, checkpoint: Path) -> Path:
    """``<checkpoint>/method_state.pt``, written atomically (a kill leaves no partial file)."""
    path = Path(checkpoint) / METHOD_STATE
    state = method.state_dict()
    atomic_write(path, lambda handle: torch.save(state, handle))
    return path


def load_method_state(method: Method, checkpoint: Path, device: torch.device) -> None:
    """Restore the method's state saved in ``checkpoint`` (tensors onto ``device``)."""
    path = Path(checkpoint) / METHOD_STATE
    if not path.is_file():
        raise FileNotFoundError(
            f"{checkpoint} has no {METHOD_STATE} (a checkpoint killed while saving, or written before the method's "
            "state was saved): it cannot be resumed exactly; experiments.training.last_complete_checkpoint skips it"
        )
    method.load_state_dict(torch.load(path, map_location=device, weights_only=True))


class MethodHooks(TrainerCallback):
    """The harness's one Trainer callback: calls the method's hooks with one step convention
    (:class:`Method`), and saves the method's state into each checkpoint the Trainer writes
    (main process only; the Trainer has written the weights, optimizer and trainer_state.json)."""

    def __init__(self, method: Method) -> None:
        self.method = method

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
        self.method.on_step_begin(state.global_step + 1, optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
        self.method.after_optimizer_step(state.global_step + 1, optimizer)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.method.on_train_end()

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        if args.should_save:
            save_method_state(self.method, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


METHODS: dict[str, type[Method]] = {}


def register_method(name: str, config_class: type[MethodConfig]) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: record the method and store its options for Hydra, as the choice
    ``method=<name>`` (the dataclass's defaults, written there only) and as the schema
    ``/schema/method/<name>`` a YAML in ``conf/method/`` may extend."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        cls.config_class = config_class
        METHODS[name] = cls
        store = ConfigStore.instance()
        store.store(group="schema/method", name=name, node=config_class)
        store.store(group="method", name=name, node=config_class(name=name))
        return cls

    return wrap


def load_methods() -> dict[str, type[Method]]:
    """Import every module :data:`experiments.registry.METHOD_MODULES` names, so that their
    :func:`register_method` decorators run."""
    from experiments.registry import METHOD_MODULES

    for module in METHOD_MODULES:
        importlib.import_module(module)
    return METHODS


def budgeted(method: str) -> bool:
    """Whether ``method=<method>`` trains what ``budget=`` sets (:attr:`Method.uses_budget`);
    True for a name no module registers (a run of a method this checkout lacks)."""
    cls = load_methods().get(method)
    return cls is None or cls.uses_budget


def row_name(method: str, budget: str) -> str:
    """``method@budget``, or ``method`` alone for one that does not use the budget
    (:func:`budgeted`): the row a run counts for in the tables and the cost estimate."""
    return f"{method}@{budget}" if budgeted(method) else method


def build_method(cfg: Any) -> Method:
    methods = load_methods()
    name: Optional[str] = cfg.name
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(methods))}")
    return methods[name](cfg)


def freeze_all_but(model: nn.Module, trainable_modules: Iterable[str]) -> None:
    """Freeze every parameter except those inside modules whose name ends with one of
    ``trainable_modules`` (the task head, typically)."""
    suffixes = tuple(trainable_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for module_name, module in model.named_modules():
        if matches(module_name, suffixes):
            for p in module.parameters():
                p.requires_grad_(True)
