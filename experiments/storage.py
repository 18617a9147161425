"""Run folders and their files, written atomically, locked while a process runs in them.

A run folder is named from what identifies the run (task, method@budget, model, seed, and a
short hash of any other override), not from a timestamp, so a re-queued job finds its own
folder; each name must stay one folder level (:func:`folder_name`), so no run writes outside
``paths.runs``. ``results.json`` is written to a temporary file and renamed into place, so a
reader never sees half a file; files get the permissions the umask gives (group-readable on
shared storage with umask 002). One process at a time runs in a folder (:func:`exclusive_lock`
on its ``.lock`` file, which names the holder). A run's identity (:func:`run_identity`) is its
resolved config, less the options that cannot change a result, plus the fingerprint of the
data files it reads (:func:`data_fingerprint`); results.json records both, with the weights'
fingerprint, and a finished run is only skipped while they still match.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from experiments.data import find_local_split, split_folder

RESULTS = "results.json"
CONFIG = "config.yaml"  # the run's resolved config
LOCK = ".lock"
PROVENANCE = "provenance.json"  # the identity and fingerprints a run (maybe interrupted) started from
FINISHED = ("completed", "diverged")  # a re-run skips these; "failed" runs are run again
PACKAGES = ("torch", "transformers", "peft", "datasets", "hydra-core", "accelerate")
# options that cannot change a run's result: left out of its identity (the data is identified
# by its content, not by data.dir) and of its folder's suffix (:func:`suffix_exclusions`);
# selection.extend_edges only decides whether a final run may start: the rate it chose is
# checked on its own (the "lr" of its provenance)
RESULT_NEUTRAL = (
    "logger", "paths", "wait_for_lock", "data.dir", "data.cache_dir", "trainer.progress_bar", "trainer.keep_checkpoints",
    "trainer.save_model", "trainer.num_threads", "trainer.save_strategy", "trainer.save_steps", "selection.extend_edges",
)
# choices the run folder's path names (a suite through its task), and a group whose every key is neutral
FOLDER_KEYS = ("method", "task", "suite", "budget", "model", "seed")
NEUTRAL_GROUPS = ("data",)


class RunLocked(RuntimeError):
    """Another process holds the run folder's lock."""


def folder_name(name: str) -> str:
    """``name`` as one level of a run folder's path; a name that would leave ``paths.runs``
    (``../x``, ``a/b``, empty) raises."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{name!r} cannot name a run folder: it must be one folder name (no '/', not '..')")
    return name


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` on a temporary file, then rename it into place, with the permissions a
    plain ``open`` would give (``mkstemp`` creates files 0600): a reader (or a run resumed after
    a kill) sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) written by :func:`atomic_write`."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def honour_umask(folder: Path) -> None:
    """Give the files under ``folder`` that a library wrote through ``mkstemp`` (mode 0600:
    transformers' ``save_pretrained``) the permissions the umask gives a plain ``open``."""
    mode = 0o666 & ~current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) == 0o600 and mode != 0o600:
            path.chmod(mode)


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


@contextlib.contextmanager
def exclusive_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing), which records the holder
    (``host:pid``). Another holder makes it wait when ``wait``, else raise :class:`RunLocked`
    naming that holder. The kernel drops the lock when the process ends, even by ``kill -9``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            if not wait:
                raise RunLocked(
                    f"{path.parent} is in use by process {holder} (lock {path}); "
                    "run again with wait_for_lock=true to wait for it"
                ) from None
            print(f"{path.parent} is in use by process {holder}: waiting for it", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{platform.node()}:{os.getpid()}\n")
        handle.flush()
        yield


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def digest_of(value: Any) -> str:
    """sha256 of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(tasks: Iterable[Any], data_dir: str | None, train: bool = True) -> dict[str, str]:
    """``<task>/<split>`` -> sha256 of the files each split the run reads is loaded from
    (``data.dir`` or the embedded files); ``hub:<path>/<config>`` for a split read from the hub,
    whose files are not hashed. ``train=False``: a run that reads no training split."""
    fingerprint = {}
    for task in tasks:
        for split in ([task.train_split] if train else []) + [task.eval_split, *task.extra_eval_splits]:
            folder = split_folder(task, split, data_dir)
            if folder is None:
                fingerprint[f"{task.name}/{split}"] = f"hub:{task.hub_path}/{task.hub_config}"
            else:
                _, paths = find_local_split(folder, task, split)
                fingerprint[f"{task.name}/{split}"] = "sha256:" + digest_of([file_digest(p) for p in paths])
    return fingerprint


def identity_config(cfg: DictConfig) -> dict[str, Any]:
    """The part of a resolved config a run's identity counts: all of it less
    :data:`RESULT_NEUTRAL` and less the protocol's entries for other tasks."""
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    protocol = config.get("protocol") or {}
    if protocol.get("per_task"):  # only this task's entry: editing another task's leaves this run as it was
        protocol["per_task"] = {t: v for t, v in protocol["per_task"].items() if t == config["task"]["name"]}
    for key in RESULT_NEUTRAL:
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return config


def run_identity(cfg: DictConfig, data: dict[str, str]) -> str:
    """The run's identity: :func:`identity_config` and its data's fingerprint. Two runs with one
    identity are the same run, wherever their folders are."""
    return digest_of({"config": identity_config(cfg), "data": data})[:16]


def stale_provenance(results: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What ``results`` was computed from otherwise than ``current`` (a run's provenance:
    ``run_id``, ``fingerprints`` and, for a final run whose rate its selection runs chose,
    ``lr``): ``data`` and / or ``weights`` when their fingerprints differ (both for results
    recorded before fingerprints were), else ``config`` when the identity differs: a preset the
    command line does not name changed (e.g. a protocol's epochs), so the run folder, named by
    the overrides, is the same but the run is not; and ``learning rate`` when the selection
    runs now choose another rate than the one the run trained at."""
    recorded = results.get("fingerprints") or {}
    stale = [key for key, value in current["fingerprints"].items() if recorded.get(key) != value]
    if not stale and results.get("run_id") != current["run_id"]:
        stale.append("config")
    if "lr" in current and results.get("lr") != current["lr"]:
        stale.append("learning rate")
    return stale


def write_provenance(run_dir: Path, provenance: dict[str, Any]) -> Path:
    path = run_dir / PROVENANCE
    atomic_write_text(path, json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return path


def read_provenance(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_config(run_dir: Path, cfg: DictConfig) -> Path:
    path = run_dir / CONFIG
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def suffix_exclusions(*, _root_: DictConfig) -> list[str]:
    """The override keys left out of a run folder's suffix (conf/config.yaml's
    ``override_dirname.exclude_keys``): :data:`FOLDER_KEYS`, :data:`NEUTRAL_GROUPS` and every
    :data:`RESULT_NEUTRAL` key with each key below it (Hydra matches keys exactly)."""
    keys = [*FOLDER_KEYS, *NEUTRAL_GROUPS]
    for key in RESULT_NEUTRAL:
        node = OmegaConf.select(_root_, key, throw_on_resolution_failure=False)
        keys += [key, *(f"{key}.{sub}" for sub in leaf_keys(node))] if isinstance(node, DictConfig) else [key]
    return keys


def leaf_keys(node: DictConfig) -> list[str]:
    """Dotted paths of the leaves under ``node``, interpolations left unresolved."""
    container = OmegaConf.to_container(node, resolve=False)
    stack, keys = [("", container)], []
    while stack:
        prefix, value = stack.pop()
        for key, child in value.items():
            path = f"{prefix}{key}"
            (stack.append((f"{path}.", child)) if isinstance(child, dict) else keys.append(path))
    return sorted(keys)


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
