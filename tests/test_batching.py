"""Length-grouped training batches and length-sorted evaluation (experiments.training)."""

from __future__ import annotations

import random

import datasets
import pytest
import torch

from experiments.data import load_split, tokenize
from experiments.methods import build_method
from experiments.models import head_type, load_model, load_tokenizer
from experiments.runner import prepare_context
from experiments.training import LengthSortedSampler, SeededLengthGroupedSampler, StepTimer, build_trainer, sequence_lengths

_rng = random.Random(0)
LENGTHS = [_rng.randint(5, 128) for _ in range(1000)]


def test_grouped_order_is_a_function_of_seed_and_epoch_alone() -> None:
    sampler = SeededLengthGroupedSampler(32, LENGTHS, seed=3)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)  # the global RNG (initialisation, dropout) does not move it
    assert list(sampler) == first
    assert sorted(first) == list(range(len(LENGTHS)))
    assert list(SeededLengthGroupedSampler(32, LENGTHS, seed=4)) != first
    sampler.set_epoch(1)
    assert list(sampler) != first


def padded_tokens(order: list[int], batch: int) -> int:
    return sum(len(chunk) * max(LENGTHS[i] for i in chunk) for chunk in (order[k : k + batch] for k in range(0, len(order), batch)))


def test_grouping_cuts_the_padding_of_random_batches() -> None:
    grouped = padded_tokens(list(SeededLengthGroupedSampler(32, LENGTHS, seed=0)), 32)
    shuffled = padded_tokens(torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(0)).tolist(), 32)
    assert grouped < 0.75 * shuffled
    assert list(LengthSortedSampler(LENGTHS)) == sorted(range(len(LENGTHS)), key=lambda i: -LENGTHS[i])


def test_a_multiple_choice_row_is_as_long_as_its_choices_padded_to_the_longest() -> None:
    rows = datasets.Dataset.from_dict({"input_ids": [[[1, 2], [1, 2, 3, 4]], [[1], [1]], [[5] * 9, [5]]]})
    assert sequence_lengths(rows) == [8, 2, 18]  # not the number of choices, 2 for every row
    assert sequence_lengths(datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4]]})) == [3, 1]


@pytest.mark.parametrize("task", ["rte", "stsb"])
def test_sorted_evaluation_gives_the_metrics_of_the_unsorted_one(make_cfg, tmp_path, task: str) -> None:  # noqa: ANN001
    results = {}
    for sort in (False, True):
        cfg = make_cfg("method=lora", f"task={task}", f"trainer.sort_eval_by_length={sort}", "trainer.eval_batch_size=4")
        torch.manual_seed(0)
        tokenizer = load_tokenizer(cfg.model)
        train, dev = (tokenize(load_split(cfg.task, split, cfg.data.dir), cfg.task, tokenizer) for split in (cfg.task.train_split, cfg.task.eval_split))
        model = load_model(cfg.model, num_labels=len(cfg.task.label_names) or 1, task_type=head_type(cfg))
        method = build_method(cfg.method)
        model = method.prepare(model, prepare_context(cfg, model, train, tokenizer))
        trainer = build_trainer(cfg, method, model, train, dev, tokenizer, tmp_path / str(sort), StepTimer())
        assert len(set(len(ids) for ids in dev["input_ids"])) > 1  # the order matters for padding
        results[sort] = trainer.evaluate()
    unsorted, ordered = results[False], results[True]
    for key in ("eval_main", *(k for k in unsorted if k.startswith("eval_") and k.endswith(("accuracy", "f1", "pearson", "spearman", "mcc")))):
        assert ordered[key] == pytest.approx(unsorted[key], abs=1e-6), key
    assert ordered["eval_loss"] == pytest.approx(unsorted["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("grouped", [True, False])
def test_the_trainer_draws_training_batches_by_the_option(make_cfg, tmp_path, grouped: bool) -> None:  # noqa: ANN001
    cfg = make_cfg("method=bitfit", f"trainer.group_by_length={grouped}")
    tokenizer = load_tokenizer(cfg.model)
    train = tokenize(load_split(cfg.task, cfg.task.train_split, cfg.data.dir), cfg.task, tokenizer)
    model = load_model(cfg.model, num_labels=2)
    method = build_method(cfg.method)
    model = method.prepare(model, prepare_context(cfg, model, train, tokenizer))
    trainer = build_trainer(cfg, method, model, train, None, tokenizer, tmp_path, StepTimer())
    assert isinstance(trainer._get_train_sampler(), SeededLengthGroupedSampler) is grouped
