"""The selection runs a best rate factor at the edge of the grid still owes
(``selection.extend_edges``, :func:`experiments.selection.owed_factor`), one ``run.py`` command
line each, for a selection sweep's cells::

    python -m experiments.edges experiment=glue_minilm_cpu_select task=stsb method=head_only,lora,taso \\
      | xargs -P2 -L1 python run.py trainer.num_threads=1       # repeat until it prints nothing
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.config import compose, register_configs
from experiments.estimate import cells, sweep
from experiments.selection import Stage, factor_scores, owed_factor


def owed_runs(overrides: list[str]) -> list[str]:
    """The selection runs ``selection.extend_edges`` still asks for in the cells of a selection
    sweep (``python run.py -m <overrides>``): each as the overrides of one ``python run.py``
    run, its cell's overrides plus ``selection.lr_factor``. A cell with no runs yet (or a method that
    trains nothing) owes nothing."""
    register_configs()
    owed = []
    for cell in cells(sweep(overrides)):
        cfg = compose(cell)
        if Stage(cfg.selection.stage) is not Stage.select:
            raise ValueError("give the selection sweep's overrides (selection.stage=select), e.g. experiment=glue_minilm_cpu_select")
        factor = owed_factor(factor_scores(cfg, Path(cfg.paths.runs)))
        if factor is not None:
            owed.append(" ".join([*cell, f"selection.lr_factor={factor:g}"]))
    return owed


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the selection runs a winner at the grid's edge still owes, one run's overrides per line.")
    parser.add_argument("overrides", nargs="*", help="the selection sweep's overrides, as run.py -m gets them")
    for line in owed_runs(parser.parse_args().overrides):
        print(line)


if __name__ == "__main__":
    main()
