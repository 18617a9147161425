"""A study's whole pipeline, one task at a time: the commands of docs/protocols.md, in order.

    python -m experiments.run_study experiment=glue_minilm_cpu task=rte,cola method=zero_shot,head_only,lora,taso
    python -m experiments.run_study experiment=glue_minilm_cpu task=rte,cola method=lora budget=r8

Per task: (1) the selection sweep, ``python run.py -m experiment=<experiment>_select`` over
the methods that train; (2) the runs a best factor at the grid's edge owes
(:mod:`experiments.edges`), ``--jobs`` at a time, again until none is owed; (3) the final
sweep, ``python run.py -m experiment=<experiment>``, at the chosen rates; (4) the study's store
refreshed from both runs folders (:mod:`analysis.store`). The other overrides go to every
run but ``seed=``, which goes to the final runs alone (the selection stage keeps its own
seed: ``seed=3,4`` adds final runs of further seeds at the rates already chosen); sweeps run
under ``hydra/launcher=local_parallel`` with ``--jobs`` runs at a time unless the command
line names a launcher. Each run is a plain ``run.py`` run, so a re-run skips what
is finished and the command resumes a study where it stopped. It stops at the first step with
a failed run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser

from experiments.config import CONF_DIR, compose, register_configs
from experiments.edges import owed_runs
from experiments.estimate import sweep
from experiments.methods import load_methods
from experiments.sweeps import threads_per_job

RUN_PY = Path(__file__).resolve().parent.parent / "run.py"
LAUNCHER = "hydra/launcher=local_parallel"
STUDY_KEYS = ("experiment", "task", "method")  # what this command sets per step; the rest passes through
FINAL_KEYS = ("seed",)  # passed to the final runs alone: a rate is chosen once, on the selection stage's seed
SELECT_SUFFIX = "_select"  # conf/experiment/<study>_select.yaml: the study's selection stage


class StepFailed(RuntimeError):
    """A run of the study failed: the command stops, a re-run resumes after the fix."""


def split_overrides(overrides: list[str]) -> tuple[str, list[str], list[str], list[str]]:
    """The study's experiment name, the overrides other than :data:`STUDY_KEYS`, those of them
    the selection stage takes (not :data:`FINAL_KEYS`), and those a composed config takes
    (neither a sweep nor a ``hydra/`` setting)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    experiments = [o.value() for o in parsed if o.get_key_element() == "experiment"]
    if len(experiments) != 1 or not isinstance(experiments[0], str):
        raise ValueError("name one study: experiment=<name> (conf/experiment/<name>.yaml, its final stage)")
    rest = [o for o in parsed if o.get_key_element() not in STUDY_KEYS]
    fixed = [o.input_line for o in rest if not o.is_sweep_override() and not o.get_key_element().startswith("hydra")]
    select = [o.input_line for o in rest if o.get_key_element() not in FINAL_KEYS]
    return experiments[0], [o.input_line for o in rest], select, fixed


def run_command(args: list[str]) -> None:
    """``python run.py <args>``; raises :class:`StepFailed` when it exits non-zero."""
    command = [sys.executable, str(RUN_PY), *args]
    print("+ " + " ".join(command[1:]), flush=True)
    code = subprocess.run(command, check=False).returncode
    if code:
        raise StepFailed(f"`{' '.join(command[1:])}` exited {code}: see its runs' results.json; re-running this command resumes")


def run_owed(owed: list[str], jobs: int) -> None:
    """The owed selection runs, ``jobs`` at a time, each on its share of the cores."""
    threads = [f"trainer.num_threads={threads_per_job(jobs)}"]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(run_command, [*(threads if "trainer.num_threads=" not in line else []), *line.split()]) for line in owed]:
            future.result()


def run_study(overrides: list[str], jobs: int = 2, store_dir: Path | None = None) -> None:
    """Every step of the study, task after task (the module's docstring)."""
    study, rest, select_rest, fixed = split_overrides(overrides)
    register_configs()
    launcher = [] if any(o.startswith("hydra/launcher=") for o in rest) else [LAUNCHER, f"hydra.launcher.n_jobs={jobs}"]
    swept = sweep([*launcher, *overrides])  # with the sweeps' launcher, so hydra.launcher.* overrides compose
    methods, known = swept["method"], load_methods()
    if unknown := [m for m in methods if m not in known]:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(known))}")
    trained = ",".join(m for m in methods if known[m].trains)
    selected = compose([f"experiment={study}", *fixed]).selection.from_runs is not None
    select = f"{study}{SELECT_SUFFIX}"
    if selected and not (CONF_DIR / "experiment" / f"{select}.yaml").is_file():
        raise ValueError(f"{study} chooses its rates from selection runs: it needs conf/experiment/{select}.yaml, its selection stage")
    for task in swept["task"]:
        if selected and trained:
            print(f"== {study}, {task}: selection", flush=True)
            cell = [f"experiment={select}", f"task={task}", f"method={trained}", *select_rest]
            run_command(["-m", *launcher, *cell])
            while owed := owed_runs([o for o in cell if not o.startswith("hydra")]):  # single runs: no launcher
                print(f"== {study}, {task}: {len(owed)} selection run(s) an edge winner owes", flush=True)
                run_owed(owed, jobs)
        print(f"== {study}, {task}: final runs", flush=True)
        run_command(["-m", *launcher, f"experiment={study}", f"task={task}", f"method={','.join(methods)}", *rest])
        refresh(study, select if selected else None, fixed, store_dir)


def refresh(study: str, select: str | None, fixed: list[str], store_dir: Path | None) -> None:
    """Add the study's finished runs (both stages) to its store."""
    from analysis.store import STORE_DIR, refresh_store  # analysis reads experiments, not the other way round at import

    folders = [Path(compose([f"experiment={name}", *fixed]).paths.runs) for name in (select, study) if name]
    path = refresh_store(study, [f for f in folders if f.is_dir()], store_dir or STORE_DIR)
    print(f"== {study}: store {path} refreshed from {', '.join(map(str, folders))}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="experiment=<study> and the overrides every run gets (task=, method= sweep)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at a time: the sweeps' (local_parallel's n_jobs) and the owed selection runs'")
    parser.add_argument("--store-dir", type=Path, help="where the study's store lies (default: results/)")
    args = parser.parse_intermixed_args()  # options anywhere among the overrides
    try:
        run_study(args.overrides, args.jobs, args.store_dir)
    except (StepFailed, ValueError) as failed:
        sys.exit(str(failed))


if __name__ == "__main__":
    main()
