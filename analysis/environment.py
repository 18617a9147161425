"""The software and machines behind a study's stored runs, from each run's ``meta`` (recorded
by experiments.storage.meta_info): one row per combination, with its run count and the table
rows it ran. A store can mix versions (a machine rebuilt mid-study installs the newest
releases pyproject.toml allows), so a published study prints this table rather than quoting
one set of versions by hand."""

from __future__ import annotations

import pandas as pd

from analysis.tables import method_labels

NOT_RECORDED = "not recorded"
PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "hydra-core")
META_COLUMNS = {
    "meta.python": "python",
    **{f"meta.versions.{package}": package for package in PACKAGES},
    "meta.machine": "machine",
    "meta.cpu_count": "cores",
    "meta.torch_threads": "threads",
}


def meta_value(value: object) -> str:
    """A recorded value as text: a whole number without the ``.0`` a missing value elsewhere in
    its column gave it, :data:`NOT_RECORDED` for none."""
    if pd.isna(value):
        return NOT_RECORDED
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def environment_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per combination of python, package versions, machine, cores and torch threads: the
    number of runs and their rows (:func:`analysis.tables.method_labels`), most runs first."""
    meta = runs.reindex(columns=list(META_COLUMNS)).rename(columns=META_COLUMNS)
    meta = meta.map(meta_value).assign(row=method_labels(runs))
    table = meta.groupby(list(META_COLUMNS.values())).agg(runs=("row", "size"), rows=("row", lambda rows: ", ".join(sorted(set(rows)))))
    return table.reset_index().sort_values(["runs", *META_COLUMNS.values()], ascending=[False, *[True] * len(META_COLUMNS)], ignore_index=True)


def environment_markdown(runs: pd.DataFrame) -> str:
    """:func:`environment_table` as Markdown, with where each run's own record is."""
    return (f"{environment_table(runs).to_markdown(index=False, disable_numparse=True)}\n\n"
            "Each stored run's `meta` (its results.json) holds these versions and the commit it ran at (`meta.git_commit`).\n")
