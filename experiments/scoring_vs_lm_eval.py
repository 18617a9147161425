"""Causal-LM choice scoring here against lm-evaluation-harness's ``HFLM.loglikelihood`` on the
same requests: the first ``--questions`` ARC-Easy test questions in lm-eval's own prompt
format (``task.prompt_format=lm_eval``), the same (context, continuation) strings, the same
model folder (SmolLM2, fp32, CPU), batch size and thread count.

lm-eval runs in its own environment (``--lm-eval-python``: a Python with ``lm_eval``
installed; the project does not depend on it), as one persistent worker process
(``experiments/lm_eval_worker.py``) that waits, idle, while this process scores. Both sides are
warm (one untimed call each) and timed from the strings to the log-likelihoods (tokenization
included). The sides alternate, ``--rounds`` rounds, the side going first swapped each round; a
round's ratio is our seconds over lm-eval's in that round, so a drift of a shared machine
between rounds cancels; printed: the median ratio and its [min, max] over rounds, and the
largest |difference| of the log-likelihoods.

    python -m experiments.scoring_vs_lm_eval --data-dir <commonsense folder> --lm-eval-python <python> [--questions 100] [--batch-size 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments import causal
from experiments.bench import scoring_questions, timed_scores
from experiments.models import load_model, load_tokenizer, model_location
from experiments.storage import meta_info

WORKER = Path(__file__).with_name("lm_eval_worker.py")


class LmEvalWorker:
    """lm-eval's ``HFLM`` in a process of ``python`` (``experiments/lm_eval_worker.py``)."""

    def __init__(self, python: str, folder: str, pairs: list[tuple[str, str]], batch_size: int, threads: int) -> None:
        self._file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8")
        json.dump(pairs, self._file)
        self._file.close()
        command = [python, str(WORKER), folder, self._file.name, str(batch_size), str(threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.versions = json.loads(self._reply("READY"))

    def _reply(self, tag: str) -> str:
        for line in self.process.stdout:
            if line.startswith(tag + " "):
                return line[len(tag) + 1 :]
        raise RuntimeError(f"lm-eval worker ended (exit code {self.process.wait()}) before {tag}; its stderr is above")

    def run(self) -> tuple[float, list[float]]:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        reply = json.loads(self._reply("RESULT"))
        return reply["seconds"], reply["loglikelihoods"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        os.unlink(self._file.name)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """The interleaved rounds; per round both sides' seconds; the largest |dlogL| over rounds."""
    cfg, rows, _ = scoring_questions(args.model, args.questions, args.data_dir)
    requests = causal.choice_requests(cfg.task, rows)
    pairs = [pair for request in requests for pair in zip(request.contexts, request.continuations)]
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, num_labels=1, task_type="causal_lm").eval()
    threads = torch.get_num_threads()
    print(f"{len(rows)} questions, {len(pairs)} (context, continuation) pairs; starting lm-eval's worker ...", flush=True)
    worker = LmEvalWorker(args.lm_eval_python, model_location(cfg.model), pairs, args.batch_size, threads)
    timed_scores(model, tokenizer, cfg.task, rows.select(range(2)), args.batch_size)  # warm-up
    seconds: dict[str, list[float]] = {"ours": [], "lm-eval": []}
    values: dict[str, list[float]] = {}
    max_diff, load = 0.0, [os.getloadavg()[0]]
    sides = {"ours": lambda: timed_scores(model, tokenizer, cfg.task, rows, args.batch_size), "lm-eval": worker.run}
    try:
        for r in range(args.rounds):
            for name in ("ours", "lm-eval") if r % 2 == 0 else ("lm-eval", "ours"):
                elapsed, values[name] = sides[name]()
                seconds[name].append(elapsed)
            max_diff = max(max_diff, float(np.max(np.abs(np.array(values["ours"]) - np.array(values["lm-eval"])))))
            load.append(os.getloadavg()[0])
            print(f"round {r + 1}: ours {seconds['ours'][-1]:.2f} s, lm-eval {seconds['lm-eval'][-1]:.2f} s", flush=True)
    finally:
        worker.close()
    picks = {name: [int(np.argmax(row)) for row in by_row(v, requests)] for name, v in values.items()}
    same_choice = sum(a == b for a, b in zip(picks["ours"], picks["lm-eval"]))
    return {"questions": len(rows), "pairs": len(pairs), "ours_s": seconds["ours"], "lm_eval_s": seconds["lm-eval"],
            "max_abs_diff": max_diff, "same_choice": same_choice, "threads": threads, "load": load, "lm_eval_versions": worker.versions}


def by_row(values: list[float], requests: list[Any]) -> list[list[float]]:
    """Flat per-pair values cut into one list per question (its choices)."""
    rows, start = [], 0
    for request in requests:
        rows.append(values[start : start + len(request.contexts)])
        start += len(request.contexts)
    return rows


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    """The printed comparison (module docstring)."""
    ratios = [a / b for a, b in zip(result["ours_s"], result["lm_eval_s"])]
    versions = meta_info()["versions"]
    theirs = result["lm_eval_versions"]
    return "\n".join(
        [
            f"Causal choice scoring, ours vs lm-evaluation-harness HFLM.loglikelihood: {result['questions']} ARC-Easy test questions "
            f"(lm_eval prompts), {result['pairs']} (context, continuation) pairs, {args.model} fp32, batch size {args.batch_size}, "
            f"{result['threads']} torch threads each, {args.rounds} interleaved rounds (first side swapped each round).",
            f"machine: {cpu_name()}, {os.cpu_count()} cores; load average (1 min) per round: "
            + ", ".join(f"{x:.1f}" for x in result["load"]),
            f"ours: torch {versions.get('torch')}, transformers {versions.get('transformers')}; lm-eval {theirs['lm_eval']}: "
            f"torch {theirs['torch']}, transformers {theirs['transformers']}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            "ours (s): " + ", ".join(f"{s:.2f}" for s in result["ours_s"]),
            "lm-eval (s): " + ", ".join(f"{s:.2f}" for s in result["lm_eval_s"]),
            f"ratio ours / lm-eval: median {statistics.median(ratios):.3f} [min {min(ratios):.3f}, max {max(ratios):.3f}] over rounds",
            f"max |dlogL| = {result['max_abs_diff']:.2e}; same argmax choice on {result['same_choice']} / {result['questions']} questions",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the commonsense folder holding ARC-Easy/test.json")
    parser.add_argument("--lm-eval-python", default=os.environ.get("LM_EVAL_PYTHON"), help="a Python with lm_eval installed ($LM_EVAL_PYTHON)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args()
    if not args.lm_eval_python:
        parser.error("--lm-eval-python (or $LM_EVAL_PYTHON): a Python with lm_eval installed, e.g. a venv with `pip install lm-eval`")
    if args.rounds < 2 or args.questions < 2:
        parser.error("--rounds and --questions must be at least 2")
    result = compare(args)
    text = report(result, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**result, "markdown": text}, indent=2) + "\n")


if __name__ == "__main__":
    main()
