"""analysis.importance_overlap: prefix sums of one pass equal passes of each length; a sorted
count is its own pass."""

from __future__ import annotations

import torch

from analysis.importance_overlap import importance_by_count, overlap
from experiments.budget import target_linears
from experiments.data import load_split, tokenize
from experiments.models import load_model, load_tokenizer
from experiments.runner import batch_source
from taso.importance import estimate_importance
from taso.selection import CoreRegion


def test_prefix_sums_equal_separate_passes(make_cfg) -> None:
    cfg = make_cfg("method=taso")
    tokenizer = load_tokenizer(cfg.model)
    train = tokenize(load_split(cfg.task, cfg.task.train_split, cfg.data.dir), cfg.task, tokenizer)
    batches = batch_source(train, tokenizer, 4, cfg.seed)
    torch.manual_seed(0)
    model = load_model(cfg.model, num_labels=2)
    weights = {n: m.weight for n, m in target_linears(model, list(cfg.model.target_modules)).items()}
    cpu = torch.device("cpu")
    prefix, _ = importance_by_count(model, weights, batches, [1, 3], cpu)
    by_sorted, _ = importance_by_count(model, weights, batches, [1, 3], cpu, sorted_batches=True)
    for n in (1, 3):
        alone, _ = estimate_importance(model, weights, batches, n, "grad_x_weight", 0, cpu)
        alone_sorted, _ = estimate_importance(model, weights, lambda: batches(sorted_prefix=n), n, "grad_x_weight", 0, cpu)
        for name in weights:
            torch.testing.assert_close(prefix[n][name], alone[name])
            torch.testing.assert_close(by_sorted[n][name], alone_sorted[name])


def test_overlap_is_the_share_of_the_reference_lines() -> None:
    region = lambda rows, cols: CoreRegion(torch.tensor(rows), torch.tensor(cols), torch.zeros(1), torch.zeros(1))  # noqa: E731
    assert overlap(region([1, 2, 3, 4], [0, 5]), region([1, 2, 7, 8], [5, 6])) == (0.5, 0.5)
