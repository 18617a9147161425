"""How TASO's core regions change with the number of importance batches.

For each count N (default 4, 8, 16, 32) the importance of every targeted matrix is the sum
over the first N batches of the run's seeded training batches (the sum is additive, so one
pass of the largest N gives every prefix), the core rows and columns are selected as
``method=taso`` selects them, and compared with the selection of the largest N: the overlap
fraction |S_N ∩ S_max| / |S_max| of the rows and of the columns (both sides have fixed
sizes, so it equals the share of lines kept; Jaccard = o / (2 - o)), the mean over matrices
and the worst matrix. ``--passes`` lists the passes compared with the first one's largest N:
a precision (fp32, or bf16 autocast) and the batching (plain seeded batches, or ``:sorted``,
the same sample sorted by length as TASO reads it).

    python -m analysis.importance_overlap [--task rte] [--model minilm] [--data-dir ../shared/data/glue]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Any

import torch

from experiments.adaptation import sensitivity, target_linears
from experiments.config import compose
from experiments.data import load_split, subsample, tokenize
from experiments.models import head_type, load_model, load_tokenizer
from experiments.precision import Precision, autocast
from experiments.runner import batch_source
from taso.method import Taso
from taso.selection import CoreRegion, select_core_regions


def importance_by_count(
    model: Any, weights: dict, batches: Any, counts: list[int], device: torch.device, sorted_batches: bool = False
) -> tuple[dict[int, dict], dict[int, float]]:
    """The importance summed over the first N batches for every N in ``counts``, and the seconds
    it took to reach each N. Plain batches: one pass, its prefix sums. Length-sorted batches
    (``batches(sorted_prefix=N)``, as TASO reads them): a pass per N, since the first N sorted
    batches of a longer pass are not the same sample."""
    totals: dict[str, torch.Tensor] = {}
    prefix: dict[int, dict] = {}
    seconds: dict[int, float] = {}
    done, start = 0, time.perf_counter()
    for n in sorted(counts):
        if sorted_batches:
            done, totals, start = 0, {}, time.perf_counter()
        source = (lambda: batches(sorted_prefix=n)) if sorted_batches else (lambda d=done: itertools.islice(batches(), d, None))
        part, seen = sensitivity(model, weights, source, n - done, device, desc=f"importance {done}-{n}")
        if seen < n - done:
            raise ValueError(f"the training set gives fewer than {n} batches")
        totals = {k: totals.get(k, 0) + v for k, v in part.items()}
        prefix[n], seconds[n] = dict(totals), time.perf_counter() - start
        done = n
    return prefix, seconds


def overlap(a: CoreRegion, b: CoreRegion) -> tuple[float, float]:
    """Shares of b's rows and of b's columns that a also selects."""
    share = lambda x, y: len(set(x.tolist()) & set(y.tolist())) / max(len(y), 1)  # noqa: E731
    return share(a.rows, b.rows), share(a.cols, b.cols)


def table(selections: dict[Any, dict[str, CoreRegion]], reference: dict[str, CoreRegion], label: str, seconds: dict[Any, float]) -> list[str]:
    lines = []
    for key, regions in selections.items():
        pairs = [overlap(regions[name], reference[name]) for name in reference]
        rows, cols = [p[0] for p in pairs], [p[1] for p in pairs]
        lines.append(
            f"| {label} | {key} | {statistics.mean(rows):.3f} | {min(rows):.3f} | {statistics.mean(cols):.3f} | {min(cols):.3f} "
            f"| {seconds[key]:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="rte")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--budget", default="r1")
    parser.add_argument("--counts", default="4,8,16,32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="local GLUE folder (default: the run's own data source)")
    parser.add_argument(
        "--passes", default="fp32,bf16,fp32:sorted,bf16:sorted",
        help="comma-separated precision[:sorted] (length-sorted batches, as TASO reads them); the first is the reference",
    )
    args = parser.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    overrides = ["method=taso", f"task={args.task}", f"model={args.model}", f"budget={args.budget}", f"seed={args.seed}", "logger=none"]
    cfg = compose([*overrides, *([f"data.dir={args.data_dir}"] if args.data_dir else [])])
    tokenizer = load_tokenizer(cfg.model)
    train = tokenize(subsample(load_split(cfg.task, cfg.task.train_split, cfg.data.dir, cfg.data.cache_dir), None, cfg.seed), cfg.task, tokenizer)
    batches = batch_source(train, tokenizer, cfg.trainer.batch_size, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, num_labels=len(cfg.task.label_names) or 1, task_type=head_type(cfg))
    device = torch.device("cpu")
    weights = {name: layer.weight for name, layer in target_linears(model, list(cfg.model.target_modules)).items()}
    rho = cfg.budget.rank / Taso(cfg.method).block_rank(cfg.budget.rank)
    select = lambda imp: select_core_regions(imp, rho, cfg.method.scope, cfg.method.granularity, cfg.seed)  # noqa: E731

    header = [
        f"TASO core regions on {args.task} ({args.model}, {args.budget}, seed {args.seed}, batch {cfg.trainer.batch_size}): "
        f"overlap with the {counts[-1]}-batch {args.passes.split(',')[0]} selection",
        "",
        "| importance pass | batches | rows: mean | rows: worst matrix | cols: mean | cols: worst matrix | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines, reference = header, None
    for spec in args.passes.split(","):
        name, _, batching = spec.partition(":")
        with autocast(Precision(name), device):
            prefix, seconds = importance_by_count(model, weights, batches, counts, device, sorted_batches=batching == "sorted")
        selections = {n: select(prefix[n]) for n in counts}
        reference = reference or selections[counts[-1]]
        lines += table(selections, reference, spec, seconds)
    print("\n".join(lines), flush=True)
    print("\n(time: seconds to reach that count, on whatever this machine was doing)")


if __name__ == "__main__":
    main()
