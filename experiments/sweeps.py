"""A ``-m`` sweep's outcome: each run records its status, and the sweep ends with a summary of
them and a non-zero exit status when a run did not finish (failed, or its folder was locked by
another process).

:class:`SweepSummary` is a Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``). At the
sweep's start it makes a status folder under the sweep's ``paths.runs`` and names it in
``$TASO_BENCH_SWEEP_STATUS``, which launcher processes inherit (joblib workers, submitit jobs);
each run writes its status there (:func:`record_status`); at the end the callback reads and
removes the folder, prints the summary and exits 1 if any run did not finish.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

from experiments.storage import FINISHED, atomic_write_text

STATUS_ENV = "TASO_BENCH_SWEEP_STATUS"


def threads_per_job(n_jobs: int) -> int:
    """Torch threads for each of ``n_jobs`` runs sharing this machine: its cores / ``n_jobs``,
    at least 1 (and 1 when ``n_jobs`` < 1, joblib's "one job per core")."""
    return 1 if n_jobs < 1 else max(1, (os.cpu_count() or 1) // n_jobs)


def record_status(job_num: int, run_dir: Path, status: str, error: Optional[str] = None) -> None:
    """Record one run's status for the sweep's summary (nothing outside a sweep)."""
    folder = os.environ.get(STATUS_ENV)
    if folder:
        record = {"run_dir": str(run_dir), "status": status, "error": error}
        atomic_write_text(Path(folder) / f"{job_num:06d}.json", json.dumps(record) + "\n")


def summary(records: list[dict[str, Any]]) -> str:
    counts = Counter(r["status"] for r in records)
    lines = [f"sweep: {len(records)} runs: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))]
    lines += [f"  {r['status']}: {r['run_dir']}: {r['error']}" for r in records if r["status"] not in FINISHED]
    return "\n".join(lines)


class SweepSummary(Callback):
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir) / ".sweeps" / f"{os.getpid()}-{os.urandom(4).hex()}"
        folder.mkdir(parents=True)
        os.environ[STATUS_ENV] = str(folder.resolve())

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        folder = Path(os.environ.pop(STATUS_ENV))
        records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        shutil.rmtree(folder, ignore_errors=True)
        with_parent = folder.parent
        if with_parent.is_dir() and not any(with_parent.iterdir()):
            with_parent.rmdir()
        print(summary(records), file=sys.stderr)
        if any(r["status"] not in FINISHED for r in records):
            sys.exit(1)
