"""make bench's round-robin scheduler on the tiny model: one Trainer at a time, every method in
every round, ratios to the floor of the same round."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import pytest

from experiments import bench
from experiments.config import compose
from experiments.models import load_tokenizer
from experiments.training import StepTimer


def test_round_robin_runs_one_trainer_at_a_time_and_every_method_each_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = argparse.Namespace(model="tiny", batch_size=4, length=16, warmup=1, rounds=3, steps=2, floor="bitfit", out=tmp_path / "r.json")
    events: list[tuple[str, str]] = []
    begin, record = StepTimer.on_step_begin, StepTimer.record

    def on_begin(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        events.append(("begin", threading.current_thread().name))
        return begin(self, *a, **k)

    def on_end(self):  # noqa: ANN001, ANN202
        events.append(("end", threading.current_thread().name))
        return record(self)

    monkeypatch.setattr(StepTimer, "on_step_begin", on_begin)
    monkeypatch.setattr(StepTimer, "record", on_end)
    tokenizer = load_tokenizer(compose(["model=tiny"]).model)
    total = args.warmup + args.rounds * args.steps
    data = bench.fixed_batches(tokenizer, total * args.batch_size, args.length, seed=0)
    table = bench.bench_precision(args, ["bitfit", "taso", "losia_pro"], "fp32", data)

    for (kind, name), (next_kind, next_name) in zip(events[::2], events[1::2]):
        assert (kind, next_kind) == ("begin", "end") and name == next_name  # never two steps at once
    timed = events[2 * 3 * args.warmup :: 2 * args.steps]  # the first step of each turn after the warm-ups
    order = [name.removeprefix("bench-") for _, name in timed]
    assert order == ["bitfit-r1", "taso-r1", "losia_pro-r1", "taso-r1", "losia_pro-r1", "bitfit-r1", "losia_pro-r1", "bitfit-r1", "taso-r1"]
    rows = {row.method: row for row in table["rows"]}
    assert rows["bitfit"].ratio_to_floor == rows["bitfit"].ratio_min == 1.0
    assert all(0 < row.ratio_min <= row.ratio_to_floor <= row.ratio_max for row in rows.values())
    assert len(table["floor_round_medians_s"]) == args.rounds and table["precision"] == "fp32"
    assert rows["taso"].importance_time_s > 0


def test_scoring_throughput_line_on_the_tiny_causal_model() -> None:
    result = bench.scoring_throughput("tiny-causal", 3, batch_size=4)
    assert result["questions"] == 3 and result["questions_per_s"] > 0
