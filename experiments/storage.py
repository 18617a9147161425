"""Run folders and their files, written atomically.

A run folder is named from what identifies the run (task, method@budget, model, seed, and a
short hash of any other override), not from a timestamp, so a re-queued job finds its own
folder. ``results.json`` is written to a temporary file and renamed into place, so a reader
never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

RESULTS = "results.json"
FINISHED = ("completed", "diverged")  # a re-run skips these; "failed" runs are run again
PACKAGES = ("torch", "transformers", "peft", "datasets", "hydra-core", "accelerate")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    path = run_dir / RESULTS
    atomic_write_text(path, json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_results(path: Path) -> dict[str, Any]:
    """A results.json; a truncated or half-written file raises with the path in the message."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a complete results file: {error}") from None


def finished_results(run_dir: Path) -> Path | None:
    """The run's results.json if it records a finished run (completed or diverged), else None."""
    path = Path(run_dir) / RESULTS
    if path.is_file():
        try:
            if read_results(path).get("status") in FINISHED:
                return path
        except ValueError:
            return None
    return None


def write_config(run_dir: Path, cfg: DictConfig) -> Path:
    path = run_dir / "config.yaml"
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def overrides_hash(overrides: str) -> str:
    """Folder suffix for overrides beyond the run's identity: ``default`` when there are none."""
    if not overrides:
        return "default"
    return hashlib.sha1(overrides.encode()).hexdigest()[:8]


def meta_info() -> dict[str, Any]:
    """Versions, git commit and machine, recorded with every result."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "versions": versions,
        "git_commit": commit,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),  # processes of a torchrun / accelerate job
        "pid": os.getpid(),
    }
