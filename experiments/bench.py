"""``make bench``: the training-step cost of every registered method on the same batches.

Every method runs the harness's own training step (the transformers Trainer with the
method's optimizer groups and per-step hooks) on identical batches of the real MiniLM (batch
32, all sequences 128 tokens). The methods are interleaved round-robin: every method's
Trainer is built first, each in its own thread, and a baton lets one of them run at a time
(``--warmup`` untimed steps each, then ``--rounds`` rounds; in a round every method takes one
turn of ``--steps`` steps, in an order rotated each round, and the floor takes a turn before
the first and after each). A method's ratio in a round is its median step over the mean of
the two floor turns around it (the floor is BitFit: biases only, so its step — forward plus
backward through the activations — is the floor for any method that adapts every layer), so
a drift of the machine slower than three turns cancels; the table gives the median of the
per-round ratios and their range. When ``--out`` (or ``--compare``) holds an earlier run, each
ratio is also printed beside that run's, with their relative difference. Also reported: peak memory (the growth while the method is built and takes its
warm-up steps), trainable parameters, the effective parameters of AdaLoRA and SoRA (final
ranks), and for TASO the importance-estimation time as a share of a 3-epoch RTE run
(importance / (importance + 3 epochs x ceil(2490 / 32) steps x median step)).
``--precision fp32,bf16`` benches each precision in turn (default: ``auto``). Last, the
causal-LM choice scoring throughput (questions/s, lm-eval's ARC-Easy prompts: the real test
questions of ``--scoring-data-dir``, synthetic ones without it; ``--scoring-questions 0`` skips
it); :mod:`experiments.scoring_vs_lm_eval` compares it with lm-evaluation-harness.

    python -m experiments.bench [--rounds 5] [--steps 3] [--methods taso,lora] [--precision fp32,bf16]
    python -m experiments.bench --tokens [--tasks rte,mrpc,cola,stsb]   # tokens/s, grouped vs random batches
    python -m experiments.bench --model mpnet --methods lora,taso --out bench/mpnet.json
    python -m experiments.bench --model smollm2 --methods lora,taso --floor lora --out bench/smollm2.json

A model without bias terms (SmolLM2, a Llama) has no BitFit: ``--floor lora`` measures the
ratios to LoRA r1 instead, and the table says so. A causal LM is measured with its LM head
(next-token loss on every position), as it trains here.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import datasets
import psutil
import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from experiments import causal
from experiments.budget import count_params
from experiments.config import compose
from experiments.methods import budgeted, build_method, load_methods
from experiments.data import load_split, tokenize
from experiments.models import head_type, load_model, load_tokenizer
from experiments.runner import prepare_context, prepare_method
from experiments.storage import atomic_write_text, meta_info
from experiments.precision import Precision, resolve_precision
from experiments.training import StepTimer, build_trainer

RTE_TRAIN = 2490  # examples in the RTE training set
EPOCHS = 3


@dataclass
class BenchRow:
    method: str
    budget: str
    trainable_params: int
    step_s: float
    ratio_to_floor: float = float("nan")
    peak_memory_mb: float = float("nan")
    importance_time_s: Optional[float] = None
    importance_share_3ep_rte: Optional[float] = None
    effective_params: Optional[int] = None
    ratio_min: float = float("nan")
    ratio_max: float = float("nan")


class MemoryWatch:
    """Peak memory during a block: the CUDA allocator's peak on a GPU, else the process's
    resident size sampled every 2 ms, above what it was when the block started."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.process = psutil.Process()
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "MemoryWatch":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        self.base = self.process.memory_info().rss
        self.high = self.base
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.high = max(self.high, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        self.thread.join()
        self.peak_mb = (self.high - self.base) / 2**20


def fixed_batches(tokenizer: Any, n: int, length: int, seed: int, causal: bool = False) -> datasets.Dataset:
    """``n`` examples of exactly ``length`` random word-piece tokens with random labels (a
    causal LM's labels are its own tokens: next-token prediction on every position)."""
    gen = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in special])
    ids = vocab[torch.randint(len(vocab), (n, length), generator=gen)]
    first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    ids[:, 0], ids[:, -1] = first, last
    columns = {
        "input_ids": ids.tolist(),
        "attention_mask": torch.ones(n, length, dtype=torch.long).tolist(),
        "labels": ids.tolist() if causal else torch.randint(2, (n,), generator=gen).tolist(),
    }
    if "token_type_ids" in tokenizer.model_input_names:
        columns["token_type_ids"] = torch.zeros(n, length, dtype=torch.long).tolist()
    return datasets.Dataset.from_dict(columns)


@dataclass
class Contender:
    """One method's Trainer, paused between its turns in its own thread."""

    method: str
    budget: str
    trainer: Any
    timer: StepTimer
    turn: "Turn"
    row: BenchRow
    extra_results: Callable[[], dict[str, Any]]  # the method's, read once training ended
    thread: Optional[threading.Thread] = None
    error: Optional[BaseException] = None


class Turn(TrainerCallback):
    """Lets its Trainer take ``grant(n)`` steps, then pauses it before the next step until the
    next grant; the scheduler waits in ``grant`` until the steps are done (or training ends)."""

    def __init__(self) -> None:
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self.left = 0

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.left == 0:
            self._done.release()
            self._go.acquire()
        self.left -= 1

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self._done.release()

    def grant(self, steps: int) -> None:
        self.left = steps
        self._go.release()
        self._done.acquire()

    def wait_paused(self) -> None:
        self._done.acquire()


def counting(collate: Any, counts: list[tuple[int, int]]) -> Any:
    """``collate`` that also records each batch's (non-pad tokens, padded tokens)."""

    def wrapped(rows: list[dict]) -> dict:
        batch = collate(rows)
        mask = batch["attention_mask"]
        counts.append((int(mask.sum()), mask.numel()))
        return batch

    return wrapped


def tokens_per_second(task: str, grouped: bool, args: argparse.Namespace) -> dict[str, float]:
    """Non-pad tokens per second of ``--method``'s training steps on ``task``'s real training
    rows, with random or length-grouped batches, over one epoch (``--token-steps`` steps when
    given; a part of an epoch favours grouping, whose first batches are the longest); and the
    share of padding."""
    overrides = [f"task={task}", f"trainer.group_by_length={grouped}", *([f"data.dir={args.data_dir}"] if args.data_dir else [])]
    cfg = bench_config(args.method, "r1", args, args.precision.split(",")[0], 1, *overrides)
    tokenizer = load_tokenizer(cfg.model)
    train = tokenize(load_split(cfg.task, cfg.task.train_split, cfg.data.dir, cfg.data.cache_dir), cfg.task, tokenizer)
    total = args.warmup + (args.token_steps or math.ceil(len(train) / args.batch_size))
    cfg = bench_config(args.method, "r1", args, args.precision.split(",")[0], total, *overrides)
    torch.manual_seed(0)
    model = load_model(cfg.model, num_labels=len(cfg.task.label_names) or 1, task_type=head_type(cfg))
    method = build_method(cfg.method)
    model = prepare_method(cfg, method, model, prepare_context(cfg, model, train, tokenizer))
    timer = StepTimer()
    trainer = build_trainer(cfg, method, model, train, None, tokenizer, args.out.parent / "tmp", timer)
    counts: list[tuple[int, int]] = []
    trainer.data_collator = counting(trainer.data_collator, counts)
    trainer.train()
    timed = list(zip(counts, timer.times))[args.warmup :]
    real, padded = sum(c[0] for c, _ in timed), sum(c[1] for c, _ in timed)
    return {"tokens_per_s": real / sum(t for _, t in timed), "pad_share": 1 - real / padded, "steps": len(timed)}


def tokens_main(args: argparse.Namespace) -> None:
    """``--tokens``: per GLUE task, tokens/s with random batches, then length-grouped ones."""
    compose(["logger=none"])
    lines = [
        f"Non-pad tokens/s of {args.method} training steps (one epoch, or --token-steps, after {args.warmup} untimed), random vs length-grouped batches",
        "",
        "| task | random: tokens/s | padding | grouped: tokens/s | padding | speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    results = {}
    for task in args.tasks.split(","):
        before, after = (tokens_per_second(task, grouped, args) for grouped in (False, True))
        results[task] = {"random": before, "grouped": after}
        lines.append(
            f"| {task} | {before['tokens_per_s']:.0f} | {100 * before['pad_share']:.0f}% | {after['tokens_per_s']:.0f} "
            f"| {100 * after['pad_share']:.0f}% | {after['tokens_per_s'] / before['tokens_per_s']:.2f}x |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    payload = {"tokens": results, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "meta": meta_info(), "markdown": text}
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    print(f"written: {args.out}")


def synthetic_questions(tokenizer: Any, n: int, seed: int = 0, choices: int = 4) -> list[dict[str, Any]]:
    """``n`` ARC-like rows: a question of 40-160 random vocabulary tokens and ``choices`` choices."""
    gen = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in special])
    records = []
    for _ in range(n):
        length = int(torch.randint(40, 160, (1,), generator=gen))
        words = tokenizer.decode(vocab[torch.randint(len(vocab), (length,), generator=gen)].tolist())
        records.append({"context": words, "choices": [f"choice {k + 1}" for k in range(choices)], "label": 0})
    return records


def scoring_questions(model_name: str, n: int, data_dir: Optional[str] = None) -> tuple[Any, Any, str]:
    """The config (``task=arc_easy`` in lm-eval's prompt format) and ``n`` questions to score:
    the first ``n`` ARC-Easy test rows of ``data_dir`` (the commonsense folder), else
    :func:`synthetic_questions`; and which of the two."""
    overrides = [f"model={model_name}", "task=arc_easy", "task.prompt_format=lm_eval", "task.allow_truncation=true", "logger=none"]
    cfg = compose([*overrides, *([f"data.dir={data_dir}"] if data_dir else [])])
    if not data_dir:
        return cfg, datasets.Dataset.from_list(synthetic_questions(load_tokenizer(cfg.model), n)), "synthetic ARC-like"
    rows = load_split(cfg.task, cfg.task.eval_split, cfg.data.dir)
    return cfg, rows.select(range(min(n, len(rows)))), "ARC-Easy test"


def timed_scores(model: torch.nn.Module, tokenizer: Any, task: Any, rows: Any, batch_size: int) -> tuple[float, list[float]]:
    """Seconds from the rows' strings to their choices' log-likelihoods (``causal.eval_set``,
    then ``causal.choice_loglikelihoods``), and the values in request order (row, then choice)."""
    begin = time.perf_counter()
    scored = causal.eval_set(task, "bench", "", rows, tokenizer)
    scores, _ = causal.choice_loglikelihoods(model, tokenizer, scored, batch_size)
    seconds = time.perf_counter() - begin
    return seconds, [float(scores[i, k]) for i, k, _, _ in scored.pairs]


def scoring_throughput(model_name: str, n_questions: int, batch_size: int = 64, data_dir: Optional[str] = None) -> dict[str, Any]:
    """Questions per second of the causal mode's choice scoring, strings to log-likelihoods
    (:func:`timed_scores`, after one untimed call on two questions)."""
    cfg, rows, source = scoring_questions(model_name, n_questions, data_dir)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, num_labels=1, task_type="causal_lm")
    timed_scores(model, tokenizer, cfg.task, rows.select(range(2)), batch_size)  # warm-up
    elapsed, values = timed_scores(model, tokenizer, cfg.task, rows, batch_size)
    return {"questions": len(rows), "pairs": len(values), "source": source, "prompts": "lm_eval", "precision": "fp32",
            "batch_size": batch_size, "seconds": elapsed, "questions_per_s": len(rows) / elapsed}


def bench_config(method_name: str, budget: str, args: argparse.Namespace, precision: str, total_steps: int, *more: str) -> Any:
    return compose(
        [
            f"method={method_name}",
            f"budget={budget}",
            f"model={args.model}",
            "logger=none",
            "trainer=fast",
            f"trainer.precision={precision}",
            f"trainer.max_steps={total_steps}",
            f"trainer.batch_size={args.batch_size}",
            "trainer.warmup_ratio=0.0",
            f"trainer.logging_steps={total_steps + 1}",
            *more,
        ]
    )


def start(
    method_name: str, budget: str, args: argparse.Namespace, precision: str, data: datasets.Dataset, out_dir: Path, turns: int
) -> Contender:
    """Build the method's model and Trainer for ``turns`` turns a round, start it in a thread
    paused before its first step, and run its warm-up steps (peak memory: the growth over both)."""
    total = args.warmup + args.rounds * turns * args.steps
    cfg = bench_config(method_name, budget, args, precision, total)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.model)
    turn = Turn()
    with MemoryWatch() as memory:
        model = load_model(cfg.model, num_labels=2, task_type=head_type(cfg))
        method = build_method(cfg.method)
        model = prepare_method(cfg, method, model, prepare_context(cfg, model, data, tokenizer))
        timer = StepTimer()
        trainer = build_trainer(cfg, method, model, data, None, tokenizer, out_dir / "unused", timer)
        trainer.callback_handler.callbacks.insert(0, turn)  # pauses before the step timer starts
        row = BenchRow(
            method=method_name,
            budget=budget,
            trainable_params=count_params(model, list(cfg.model.head_modules))["trainable_params"],
            step_s=float("nan"),
        )
        contender = Contender(method_name, budget, trainer, timer, turn, row, lambda: method.extra_results(model))

        def train() -> None:
            try:
                trainer.train()
            except BaseException as error:  # noqa: BLE001 - re-raised by the scheduler
                contender.error = error
                turn.on_train_end(None, None, None)

        contender.thread = threading.Thread(target=train, name=f"bench-{method_name}-{budget}", daemon=True)
        contender.thread.start()
        turn.wait_paused()
        run_turn(contender, args.warmup)
    row.peak_memory_mb = memory.peak_mb
    return contender


def run_turn(contender: Contender, steps: int) -> list[float]:
    """``steps`` steps of one contender; their times."""
    before = len(contender.timer.times)
    contender.turn.grant(steps)
    if contender.error is not None:
        raise RuntimeError(f"bench: {contender.method} {contender.budget} failed") from contender.error
    return contender.timer.times[before:]


def interleaved_rounds(contenders: list[Contender], rounds: int, steps: int) -> tuple[list[list[float]], list[list[float]]]:
    """Per round, the floor (``contenders[0]``) between every two others, whose order rotates
    from round to round (F o1 F o2 ... F ok F), ``steps`` steps a turn: each contender's median
    step in the round (the floor's: the median of its turns) and its ratio to the mean of the
    two floor turns around it, which cancels a drift of the machine slower than three turns."""
    floor, others = contenders[0], contenders[1:]
    medians = [[float("nan")] * len(contenders) for _ in range(rounds)]
    ratios = [[1.0] * len(contenders) for _ in range(rounds)]
    for r in tqdm(range(rounds), desc="bench rounds"):
        floors = [statistics.median(run_turn(floor, steps))]
        for k in range(len(others)):
            i = 1 + (k + r) % len(others)
            medians[r][i] = statistics.median(run_turn(contenders[i], steps))
            floors.append(statistics.median(run_turn(floor, steps)))
            ratios[r][i] = medians[r][i] / statistics.mean(floors[-2:])
        medians[r][0] = statistics.median(floors)
    return medians, ratios


def turns_per_round(floor: bool, contenders: int) -> int:
    """Turns a round gives the floor (one before the first other and one after each) or any
    other contender (one) among ``contenders`` (:func:`interleaved_rounds`)."""
    return contenders if floor else 1


def plan(methods: list[str], floor: str = "bitfit") -> list[tuple[str, str]]:
    """The floor method (BitFit) first; every other method at r1; LoRA also at r8."""
    runs = [(floor, "r1")]
    for name in methods:
        if name != floor:
            runs.append((name, "r1"))
        if name == "lora":
            runs.append(("lora", "r8"))
    return runs


def bench_precision(args: argparse.Namespace, methods: list[str], precision: str, data: datasets.Dataset) -> dict[str, Any]:
    """The round-robin table of one precision: rows (ratio = median of per-round ratios, with
    min and max) and the floor's per-round medians."""
    contenders, runs = [], plan(methods, args.floor)
    for k, (name, budget) in enumerate(runs):
        print(f"bench [{precision}]: building {name} {budget} ...", flush=True)
        turns = turns_per_round(k == 0, len(runs))
        contenders.append(start(name, budget, args, precision, data, args.out.parent / "tmp", turns))
    medians, round_ratios = interleaved_rounds(contenders, args.rounds, args.steps)
    for contender in contenders:  # the last grant ends each Trainer
        contender.thread.join()
    floors = [round_medians[0] for round_medians in medians]
    rows = []
    for i, contender in enumerate(contenders):
        ratios = [per_round[i] for per_round in round_ratios]
        row = contender.row
        extra = contender.extra_results()
        row.importance_time_s, row.effective_params = extra.get("importance_time_s"), extra.get("effective_params")
        row.step_s = statistics.median(round_medians[i] for round_medians in medians)
        row.ratio_to_floor = statistics.median(ratios)
        row.ratio_min, row.ratio_max = min(ratios), max(ratios)
        if row.importance_time_s is not None:
            steps = EPOCHS * math.ceil(RTE_TRAIN / args.batch_size)
            row.importance_share_3ep_rte = row.importance_time_s / (row.importance_time_s + steps * row.step_s)
        rows.append(row)
    del contenders
    gc.collect()
    resolved = resolve_precision(precision, torch.device("cuda" if torch.cuda.is_available() else "cpu")).value
    return {"precision": resolved, "rows": rows, "floor_round_medians_s": floors}


def to_markdown(rows: list[BenchRow], floors: list[float], floor_name: str = "bitfit", precision: str = "fp32") -> str:
    label = "BitFit" if floor_name == "bitfit" else f"{floor_name} r1"
    lines = [
        f"Precision {precision}; ratio = median over {len(floors)} rounds of (method's median step / mean of the {label} turns before and after it), "
        f"[min, max] over rounds: a {100 * median_coverage(len(floors)):.1f}% confidence interval for the median ratio (distribution-free).",
        "",
        f"| method | budget | trainable params | effective params | median step (s) | ratio to {label} | [min, max] | peak memory (MB) | importance share of 3-epoch RTE |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = "" if r.importance_share_3ep_rte is None else f"{100 * r.importance_share_3ep_rte:.1f}%"
        budget = r.budget if budgeted(r.method) else "—"
        effective = "" if r.effective_params is None else f"{r.effective_params:,}"
        lines.append(
            f"| {r.method} | {budget} | {r.trainable_params:,} | {effective} | {r.step_s:.3f} | {r.ratio_to_floor:.3f}x "
            f"| [{r.ratio_min:.3f}, {r.ratio_max:.3f}] | {r.peak_memory_mb:.0f} | {share} |"
        )
    lines.append("")
    lines.append(f"{label} floor per round (s): " + ", ".join(f"{f:.3f}" for f in floors))
    widths = {(r.method, r.budget): (r.ratio_max - r.ratio_min) / r.ratio_to_floor for r in rows if r.method != floor_name}
    if widths:
        (method, budget), width = max(widths.items(), key=lambda item: item[1])
        lines.append(f"Resolution: the widest interval spans ±{50 * width:.1f}% of its ratio ({method} {budget}); "
                     "ratios closer than that are not told apart.")
    return "\n".join(lines)


def median_coverage(rounds: int) -> float:
    """The probability that the [min, max] of ``rounds`` independent per-round ratios holds
    their distribution's median: every round falls on one side of it with probability 2^-rounds
    each way (the sign test's interval), so 1 - 2^(1 - rounds); 96.9% for 6 rounds."""
    return 1 - 2.0 ** (1 - rounds)


def agreement(tables: list[dict[str, Any]], previous: dict[str, Any], source: Path) -> str:
    """This run's ratios beside an earlier run's (same precision, method and budget) and their
    relative difference; the largest difference last."""
    earlier = {
        (table["precision"], row["method"], row["budget"]): row["ratio_to_floor"] for table in previous.get("tables", []) for row in table["rows"]
    }
    when = previous.get("date", "date unknown")
    lines = [f"Agreement with the earlier run in {source} ({when}):", "", "| precision | method | budget | ratio now | ratio then | difference |", "|---|---|---|---:|---:|---:|"]
    worst = (0.0, "")
    for table in tables:
        for row in table["rows"]:
            key = (table["precision"], row["method"], row["budget"])
            if key not in earlier or row["method"] == previous.get("floor_method"):
                continue
            diff = row["ratio_to_floor"] / earlier[key] - 1
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {row['ratio_to_floor']:.3f}x | {earlier[key]:.3f}x | {100 * diff:+.1f}% |")
            worst = max(worst, (abs(diff), " ".join(key)))
    if len(lines) == 4:
        return f"No ratio of {source} matches this run's precisions and methods."
    return "\n".join([*lines, "", f"largest |difference|: {100 * worst[0]:.1f}% ({worst[1]})"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--methods", default="all", help="comma-separated, or 'all' registered methods")
    parser.add_argument("--rounds", type=int, default=6, help="round-robin rounds (each method measured in each)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per turn (their median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method before the first round")
    parser.add_argument("--precision", default="auto", help="comma-separated: auto, fp32, bf16 (each its own table)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--compare", type=Path, default=None, help="an earlier run's json to compare the ratios with (default: --out, if it exists)")
    parser.add_argument("--floor", default="bitfit", help="the method the ratios divide by (lora for bias-free models)")
    parser.add_argument("--scoring-model", default="smollm2", help="causal LM of the scoring-throughput line")
    parser.add_argument("--scoring-questions", type=int, default=40, help="questions of the scoring line (0: skip it)")
    parser.add_argument("--scoring-data-dir", default=None, help="commonsense folder: score its ARC-Easy test questions (default: synthetic ones)")
    parser.add_argument("--tokens", action="store_true", help="only tokens/s on real GLUE batches, random vs length-grouped")
    parser.add_argument("--tasks", default="rte,mrpc,cola,stsb", help="--tokens: the GLUE tasks")
    parser.add_argument("--data-dir", default=None, help="--tokens: local GLUE folder (default: the hub)")
    parser.add_argument("--method", default="bitfit", help="--tokens: the method trained")
    parser.add_argument("--token-steps", type=int, default=None, help="--tokens: timed steps per task (default: one epoch)")
    args = parser.parse_args()
    if args.tokens:
        return tokens_main(args)
    registered = sorted(name for name, method in load_methods().items() if method.trains)  # zero_shot has no step
    methods = registered if args.methods == "all" else args.methods.split(",")
    unknown = set(methods) - set(registered)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; registered: {', '.join(registered)}")
    precisions = args.precision.split(",")
    bad = [p for p in precisions if p not in {x.value for x in Precision}]
    if bad:
        parser.error(f"unknown --precision {bad}; valid: {', '.join(x.value for x in Precision)}")
    if args.rounds < 2 or args.steps < 1:
        parser.error("--rounds must be at least 2 and --steps at least 1")

    compose(["logger=none"])  # registers schemas and methods
    model_cfg = compose([f"model={args.model}"]).model
    tokenizer = load_tokenizer(model_cfg)
    total = args.warmup + args.rounds * turns_per_round(True, len(plan(methods, args.floor))) * args.steps  # the floor's
    data = fixed_batches(tokenizer, total * args.batch_size, args.length, seed=0, causal=model_cfg.kind == "causal_lm")
    tables, markdown = [], []
    for precision in precisions:
        table = bench_precision(args, methods, precision, data)
        text = to_markdown(table["rows"], table["floor_round_medians_s"], args.floor, table["precision"])
        print(text, flush=True)
        markdown.append(text)
        tables.append({**table, "rows": [asdict(r) for r in table["rows"]], "markdown": text})
    scoring = None
    if args.scoring_questions > 0:
        scoring = scoring_throughput(args.scoring_model, args.scoring_questions, data_dir=args.scoring_data_dir)
        line = (
            f"Causal scoring ({args.scoring_model}, {scoring['questions']} {scoring['source']} questions, {scoring['pairs']} (context, choice) pairs, "
            f"lm_eval prompts, {scoring['precision']}, batch {scoring['batch_size']}): {scoring['questions_per_s']:.2f} questions/s"
        )
        print(line)
        markdown.append(line)
    payload = {
        "tables": tables,
        "scoring": scoring,
        "floor_method": args.floor,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "meta": meta_info(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "markdown": "\n\n".join(markdown),
    }
    compare = args.compare or (args.out if args.out.exists() else None)
    if compare is not None:
        text = agreement(tables, json.loads(compare.read_text()), compare)
        print(text)
        payload["agreement"] = text
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
