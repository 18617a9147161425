"""make bench's round-robin scheduler on the tiny model: one Trainer at a time, every method in
every round, ratios to the floor of the same round."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import pytest
import torch

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
    order = [name.removeprefix("bench-").removesuffix("-r1") for _, name in timed]
    assert order == [
        "bitfit", "taso", "bitfit", "losia_pro", "bitfit",  # the floor around every other turn
        "bitfit", "losia_pro", "bitfit", "taso", "bitfit",  # the others' order rotates
        "bitfit", "taso", "bitfit", "losia_pro", "bitfit",
    ]
    rows = {row.method: row for row in table["rows"]}
    assert rows["bitfit"].ratio_to_floor == rows["bitfit"].ratio_min == 1.0
    assert all(0 < row.ratio_min <= row.ratio_to_floor <= row.ratio_max for row in rows.values())
    assert len(table["floor_round_medians_s"]) == args.rounds and table["precision"] == "fp32"
    assert rows["taso"].importance_time_s > 0


def test_a_ratio_divides_by_the_floor_turns_on_either_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """A floor that slows down linearly while the method costs exactly 1.5x it at every moment:
    each ratio reads 1.5 (the mean of the bracketing floor turns cancels the drift)."""
    clock = iter(range(1000))
    step = lambda name: (1.5 if name != "floor" else 1.0) * (1 + 0.05 * next(clock))  # noqa: E731
    monkeypatch.setattr(bench, "run_turn", lambda contender, steps: [step(contender.method)])
    contenders = [argparse.Namespace(method=name) for name in ("floor", "a", "b")]
    medians, ratios = bench.interleaved_rounds(contenders, rounds=2, steps=1)
    assert [r[0] for r in ratios] == [1.0, 1.0]
    assert all(r[1:] == pytest.approx([1.5, 1.5]) for r in ratios)
    assert medians[0][0] == pytest.approx(1.10)  # the median of the floor's three turns (at clock 0, 2, 4)


def test_the_min_max_over_rounds_is_the_stated_confidence_interval_of_the_median() -> None:
    """Simulated rounds of a skewed ratio (log-normal around 1.05): [min, max] of 6 rounds holds
    the true median as often as the table's caption says, 96.9%."""
    gen = torch.Generator().manual_seed(0)
    rounds = 1.05 * torch.exp(0.05 * torch.randn(20000, 6, generator=gen))
    covered = ((rounds.min(1).values <= 1.05) & (rounds.max(1).values >= 1.05)).float().mean().item()
    assert bench.median_coverage(6) == pytest.approx(0.96875) and covered == pytest.approx(0.96875, abs=0.005)


def test_the_table_says_its_confidence_and_the_widest_interval() -> None:
    rows = [bench.BenchRow("bitfit", "r1", 1, 1.0, 1.0, ratio_min=1.0, ratio_max=1.0),
            bench.BenchRow("taso", "r1", 1, 1.1, 1.10, ratio_min=1.00, ratio_max=1.22),
            bench.BenchRow("lora", "r1", 1, 1.2, 1.20, ratio_min=1.17, ratio_max=1.23)]
    text = bench.to_markdown(rows, floors=[1.0] * 6)
    assert "a 96.9% confidence interval for the median ratio" in text
    assert "the widest interval spans ±10.0% of its ratio (taso r1)" in text


def test_a_second_run_prints_each_ratio_beside_the_earlier_ones() -> None:
    row = lambda method, ratio: {"method": method, "budget": "r1", "ratio_to_floor": ratio}  # noqa: E731
    earlier = {"floor_method": "bitfit", "date": "2026-12-01T10:00:00+00:00",
               "tables": [{"precision": "bf16", "rows": [row("bitfit", 1.0), row("taso", 1.00), row("lora", 1.10)]}]}
    now = [{"precision": "bf16", "rows": [row("bitfit", 1.0), row("taso", 1.02), row("lora", 1.10), row("sora", 1.0)]},
           {"precision": "fp32", "rows": [row("taso", 0.9)]}]
    text = bench.agreement(now, earlier, Path("bench/results.json"))
    assert "| bf16 | taso | r1 | 1.020x | 1.000x | +2.0% |" in text and "| bf16 | lora | r1 | 1.100x | 1.100x | +0.0% |" in text
    assert "sora" not in text and "fp32" not in text.split("\n", 1)[1] and "| bitfit |" not in text
    assert text.endswith("largest |difference|: 2.0% (bf16 taso r1)") and "2026-12-01T10:00:00+00:00" in text
    assert "No ratio" in bench.agreement(now, {"tables": []}, Path("x.json"))


def test_scoring_throughput_line_on_the_tiny_causal_model() -> None:
    result = bench.scoring_throughput("tiny-causal", 3, batch_size=4)
    assert result["questions"] == 3 and result["questions_per_s"] > 0


def test_scoring_line_scores_the_real_arc_easy_questions_of_a_data_folder(commonsense_dir: Path) -> None:
    result = bench.scoring_throughput("tiny-causal", 3, batch_size=4, data_dir=str(commonsense_dir))
    assert result["source"] == "ARC-Easy test" and result["questions"] == 3
    assert result["pairs"] == 4 + 5 + 4  # the fixture's second question has a fifth choice
    synthetic = bench.scoring_throughput("tiny-causal", 3, batch_size=4)
    assert synthetic["source"] == "synthetic ARC-like" and synthetic["pairs"] == 12


FAKE_WORKER = '''
import json, sys
pairs = json.load(open(sys.argv[2]))
print("READY " + json.dumps({"lm_eval": "fake", "torch": "-", "transformers": "-", "argv": sys.argv[3:]}), flush=True)
for line in sys.stdin:
    print("RESULT " + json.dumps({"seconds": 0.5, "loglikelihoods": [-float(len(x)) for _, x in pairs]}), flush=True)
'''


def test_scoring_vs_lm_eval_sends_the_same_strings_and_compares_each_round(
    commonsense_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lm-eval side replaced by a worker that answers -len(continuation) per pair: the
    driver's rounds, ratios and differences are computed from what the worker returned."""
    from experiments import causal, scoring_vs_lm_eval

    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER, encoding="utf-8")
    monkeypatch.setattr(scoring_vs_lm_eval, "WORKER", fake)
    ours: list[list[float]] = []

    def recorded(*a, **k):  # noqa: ANN002, ANN003, ANN202
        seconds, values = bench.timed_scores(*a, **k)
        ours.append(values)
        return seconds, values

    monkeypatch.setattr(scoring_vs_lm_eval, "timed_scores", recorded)
    monkeypatch.setattr(scoring_vs_lm_eval, "model_location", lambda cfg: "random weights")
    args = argparse.Namespace(model="tiny-causal", questions=3, data_dir=str(commonsense_dir), batch_size=4, rounds=2,
                              lm_eval_python=sys.executable)
    result = scoring_vs_lm_eval.compare(args)
    cfg, rows, _ = bench.scoring_questions("tiny-causal", 3, str(commonsense_dir))
    requests = causal.choice_requests(cfg.task, rows)
    theirs = [-float(len(x)) for r in requests for x in r.continuations]
    assert result["pairs"] == len(theirs) == 13 and result["lm_eval_s"] == [0.5, 0.5] and len(result["ours_s"]) == 2
    assert result["lm_eval_versions"]["argv"] == ["4", str(torch.get_num_threads())]
    timed = ours[1:]  # after the warm-up
    assert len(timed) == 2 and all(len(values) == 13 for values in timed)
    assert result["max_abs_diff"] == max(abs(a - b) for values in timed for a, b in zip(values, theirs))
    picks = [scoring_vs_lm_eval.by_row(v, requests) for v in (timed[-1], theirs)]
    assert result["same_choice"] == sum(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__) for a, b in zip(*picks))
    text = scoring_vs_lm_eval.report(result, args)
    assert "ratio ours / lm-eval: median" in text and f"same argmax choice on {result['same_choice']} / 3" in text
