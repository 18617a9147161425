"""``make bench``: the training-step cost of every registered method on the same batches.

Every method runs the harness's own training step (the transformers Trainer with the
method's optimizer groups and per-step hooks) for ``--steps`` steps on identical batches of
the real MiniLM (batch 32, all sequences 128 tokens). Reported per method: the median step
time as a ratio to BitFit's median step measured in the same process (BitFit trains biases
only, so its step — forward plus backward through the activations — is the floor for any
method that adapts every layer), peak memory, trainable parameters, and the effective
parameters of the methods that report them (the final-rank count of AdaLoRA and SoRA). BitFit is measured
first and last; the floor is the mean of the two medians, and both are printed so drift is
visible (an untimed BitFit pass runs before both to pay one-time costs). For TASO, the importance-estimation time is also reported as a share of a 3-epoch
RTE run (importance / (importance + 3 epochs x ceil(2490 / 32) steps x median step)).

    python -m experiments.bench [--steps 12] [--methods taso,lora] [--out bench/results.json]
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
from pathlib import Path
from typing import Any, Optional

import datasets
import psutil
import torch

from experiments.budget import count_params
from experiments.config import compose
from experiments.methods import build_method, load_methods
from experiments.models import head_type, load_model, load_tokenizer
from experiments.runner import prepare_context
from experiments.storage import atomic_write_text, meta_info
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


def measure(method_name: str, budget: str, args: argparse.Namespace, data: datasets.Dataset, out_dir: Path) -> BenchRow:
    cfg = compose(
        [
            f"method={method_name}",
            f"budget={budget}",
            f"model={args.model}",
            "logger=none",
            "trainer=fast",
            f"trainer.max_steps={args.steps}",
            f"trainer.batch_size={args.batch_size}",
            "trainer.warmup_ratio=0.0",
            f"trainer.logging_steps={args.steps + 1}",
        ]
    )
    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg.model)
    with MemoryWatch() as memory:
        model = load_model(cfg.model, num_labels=2, task_type=head_type(cfg))
        method = build_method(cfg.method)
        model = method.prepare(model, prepare_context(cfg, model, data, tokenizer))
        timer = StepTimer()
        trainer = build_trainer(cfg, method, model, data, None, tokenizer, out_dir / "unused", timer)
        trainer.train()
    extra = method.extra_results(model)
    row = BenchRow(
        method=method_name,
        budget=budget,
        trainable_params=count_params(model, list(cfg.model.head_modules))["trainable_params"],
        step_s=statistics.median(timer.times[args.warmup :]),
        peak_memory_mb=memory.peak_mb,
        importance_time_s=extra.get("importance_time_s"),
        effective_params=extra.get("effective_params"),
    )
    if row.importance_time_s is not None:
        steps = EPOCHS * math.ceil(RTE_TRAIN / args.batch_size)
        row.importance_share_3ep_rte = row.importance_time_s / (row.importance_time_s + steps * row.step_s)
    del trainer, model, method
    gc.collect()
    return row


def plan(methods: list[str], floor: str = "bitfit") -> list[tuple[str, str]]:
    """The floor method (BitFit) first and last; every other method at r1; LoRA also at r8."""
    runs = [(floor, "r1")]
    for name in methods:
        if name != floor:
            runs.append((name, "r1"))
        if name == "lora":
            runs.append(("lora", "r8"))
    return runs + [(floor, "r1")]


def to_markdown(rows: list[BenchRow], floor: float, floors: list[float], floor_name: str = "bitfit") -> str:
    label = "BitFit" if floor_name == "bitfit" else f"{floor_name} r1"
    lines = [
        f"| method | budget | trainable params | effective params | median step (s) | ratio to {label} | peak memory (MB) | importance share of 3-epoch RTE |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = "" if r.importance_share_3ep_rte is None else f"{100 * r.importance_share_3ep_rte:.1f}%"
        budget = "—" if r.method in ("bitfit", "full") else r.budget
        effective = "" if r.effective_params is None else f"{r.effective_params:,}"
        lines.append(
            f"| {r.method} | {budget} | {r.trainable_params:,} | {effective} | {r.step_s:.3f} | {r.ratio_to_floor:.2f}x | {r.peak_memory_mb:.0f} | {share} |"
        )
    lines.append("")
    lines.append(f"{label} floor: {floor:.3f} s (first {floors[0]:.3f} s, last {floors[1]:.3f} s).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--methods", default="all", help="comma-separated, or 'all' registered methods")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--floor", default="bitfit", help="the method the ratios divide by (lora for bias-free models)")
    args = parser.parse_args()
    registered = sorted(name for name, method in load_methods().items() if method.trains)  # zero_shot has no step
    methods = registered if args.methods == "all" else args.methods.split(",")
    unknown = set(methods) - set(registered)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; registered: {', '.join(registered)}")
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    compose(["logger=none"])  # registers schemas and methods
    model_cfg = compose([f"model={args.model}"]).model
    tokenizer = load_tokenizer(model_cfg)
    data = fixed_batches(tokenizer, args.steps * args.batch_size, args.length, seed=0, causal=model_cfg.kind == "causal_lm")
    work = args.out.parent / "tmp"
    measure(args.floor, "r1", args, data, work)  # warm-up: one-time costs (threads, allocator) are paid here
    rows = []
    for name, budget in plan(methods, args.floor):
        print(f"bench: {name} {budget} ...", flush=True)
        rows.append(measure(name, budget, args, data, work))
    floors = [rows[0].step_s, rows[-1].step_s]
    floor = statistics.mean(floors)
    rows = rows[:-1]
    for row in rows:
        row.ratio_to_floor = row.step_s / floor
    table = to_markdown(rows, floor, floors, args.floor)
    print(table)
    payload = {
        "rows": [asdict(r) for r in rows],
        "floor_method": args.floor,
        "floor_s": floor,
        "floor_medians_s": floors,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "meta": meta_info(),
        "markdown": table,
    }
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
