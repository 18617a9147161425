"""Shared fixtures: tiny GLUE folders in the real on-disk formats, and composed configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from experiments.config import compose  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

PAIRS = [
    ("A man is playing a guitar.", "A person plays an instrument."),
    ("The cat sat on the mat.", 'He said "no to the offer.'),  # a lone quote, as in RTE row 2164
    ("Stocks fell sharply on Monday.", "Markets rose on Monday."),
    ("She bought a new car.", "She purchased a vehicle."),
]


MNLI_LABELS = ["entailment", "neutral", "contradiction"]
MNLI_COLUMNS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]  # then label1..labelN, gold_label
# the files of each GLUE folder (MNLI has two dev sets)
GLUE_FILES = {"MNLI": ("train", "dev_matched", "dev_mismatched")}


def glue_rows(task: str, n: int, n_votes: int = 1) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a GLUE TSV file, with the task's real columns and label values
    (``n_votes``: MNLI's annotator label columns, 1 in train.tsv and 5 in the dev files)."""
    rows = []
    for i in range(n):
        s1, s2 = PAIRS[i % len(PAIRS)]
        if task == "RTE":
            rows.append([str(i), s1, s2, ["entailment", "not_entailment"][i % 2]])
        elif task == "MRPC":
            rows.append([str(i % 2), str(1000 + i), str(2000 + i), s1, s2])
        elif task == "CoLA":
            rows.append(["gj04", str(i % 2), "" if i % 2 else "*", s1])
        elif task == "STS-B":
            rows.append([str(i), "main-news", "MSRvid", "2012test", str(i), "none", "none", s1, s2, f"{(i % 6) * 0.8:.3f}"])
        elif task == "SST-2":
            rows.append([s1, str(i % 2)])
        elif task == "QQP":
            rows.append([str(i), str(10 + i), str(20 + i), s1, s2, str(i % 2)])
        elif task == "QNLI":
            rows.append([str(i), s1, s2, ["entailment", "not_entailment"][i % 2]])
        elif task == "MNLI":
            gold = MNLI_LABELS[i % 3]
            parses = [f"( {s1} )", f"( {s2} )", f"(ROOT {s1})", f"(ROOT {s2})"]
            rows.append([str(i), str(100 + i), f"{100 + i}e", "fiction", *parses, s1, s2, *[gold] * n_votes, gold])
    header = {
        "RTE": ["index", "sentence1", "sentence2", "label"],
        "MRPC": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        "CoLA": [],
        "STS-B": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
        "SST-2": ["sentence", "label"],
        "QQP": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        "QNLI": ["index", "question", "sentence", "label"],
        "MNLI": MNLI_COLUMNS + [f"label{k}" for k in range(1, n_votes + 1)] + ["gold_label"],
    }[task]
    return header, rows


def write_glue_task(root: Path, task: str, n_train: int = 24, n_dev: int = 12) -> Path:
    """A GLUE folder; MNLI's dev_mismatched.tsv has half the rows of dev_matched.tsv."""
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "dev": n_dev, "dev_matched": n_dev, "dev_mismatched": n_dev // 2}
    for split in GLUE_FILES.get(task, ("train", "dev")):
        header, rows = glue_rows(task, sizes[split], 1 if split == "train" else 5)
        lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
        text = "\n".join(lines) + "\n"
        if task == "MRPC":
            text = "\ufeff" + text  # the real MRPC files start with a UTF-8 BOM
        (folder / f"{split}.tsv").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def glue_dir(tmp_path: Path) -> Path:
    root = tmp_path / "glue"
    for task in ("RTE", "MRPC", "CoLA", "STS-B", "SST-2", "QQP", "QNLI", "MNLI"):
        write_glue_task(root, task)
    return root


def slow_except(values, fast: set[str]) -> list:  # noqa: ANN001
    """Parametrize ``values`` with every value outside ``fast`` marked slow (make test runs
    the ``fast`` ones, make test-all all of them)."""
    return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


def fast_configs(data_dir: Path, runs: Path) -> Callable[..., object]:
    """Configs for fast runs on model=tiny (unless overridden) over the files in ``data_dir``."""

    def make(*overrides: str):
        return compose(["model=tiny", "trainer=fast", "logger=none", f"data.dir={data_dir}", f"paths.runs={runs}", *overrides])

    return make


@pytest.fixture
def make_cfg(glue_dir: Path, tmp_path: Path) -> Callable[..., object]:
    """A config for a fast run on model=tiny over the tiny GLUE folder."""
    return fast_configs(glue_dir, tmp_path / "runs")


OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def run_py(*args: str, launcher: tuple[str, ...] = ()) -> list[str]:
    """The command line of ``python run.py <args>``, behind ``launcher`` (e.g. torchrun) if given."""
    return [*(launcher or (sys.executable,)), str(REPO / "run.py"), *args]


def run_cli(*args: str, cwd: Path, launcher: tuple[str, ...] = (), timeout: int = 600) -> subprocess.CompletedProcess:
    """``python run.py <args>`` in a subprocess, offline."""
    return subprocess.run(run_py(*args, launcher=launcher), capture_output=True, text=True, cwd=cwd, env=OFFLINE_ENV, timeout=timeout)


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess]:
    return run_cli


# --- commonsense: the LLM-Adapters JSON layout (and PIQA's original JSONL) ---------------------

GOALS = ["How do I open a jar?", "How do I dry wet shoes?", "How to cool soup fast?"]
SOLUTIONS = [("Twist the lid.", "Bake the jar."), ("Stuff them with paper.", "Freeze them."), ("Stir it in an ice bath.", "Boil it.")]


def llm_adapters_item(task: str, i: int) -> dict[str, str]:
    """One item as the LLM-Adapters files write it (instruction text, answer key)."""
    goal, (good, bad) = GOALS[i % 3], SOLUTIONS[i % 3]
    first = i % 2 == 0  # the right answer alternates between choice 1 and choice 2
    a, b = (good, bad) if first else (bad, good)
    if task == "boolq":
        instruction = f"Please answer the following question with true or false, question: is {goal.lower()}\n\nAnswer format: true/false"
        answer = "true" if first else "false"
    elif task == "piqa":
        instruction = (
            f"Please choose the correct solution to the question: {goal}\n\nSolution1: {a}\n\nSolution2: {b}"
            "\n\nAnswer format: solution1/solution2"
        )
        answer = "solution1" if first else "solution2"
    elif task == "winogrande":
        instruction = (
            "Please choose the correct answer to fill in the blank to complete the given sentence: "
            f"Sarah helped Maria so _ said thanks.\n\nOption1: {a} Option2: {b} Answer format: option1/option2"
        )
        answer = "option1" if first else "option2"
    else:  # siqa, ARC, OpenBookQA (Answer1..AnswerN), HellaSwag (Ending1..EndingN)
        word, n = ("Ending", 4) if task == "hellaswag" else ("Answer", 3 if task == "social_i_qa" else 4)
        choices = [a, b, *[f"filler {k}" for k in range(n - 2)]]
        if task == "ARC-Easy" and i == 1:
            choices.append("a fifth choice")  # ARC has a few 3- and 5-choice questions
        listed = " ".join(f"{word}{k + 1}: {c}" for k, c in enumerate(choices))
        keys = "/".join(f"{word.lower()}{k + 1}" for k in range(len(choices)))
        instruction = f"Please choose the correct answer to the question: {goal}\n\n{listed}\n\nAnswer format: {keys}"
        answer = f"{word.lower()}{1 if first else 2}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


FOLDERS = {"boolq": "boolq", "piqa": "piqa", "siqa": "social_i_qa", "hellaswag": "hellaswag", "winogrande": "winogrande",
           "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "openbookqa": "openbookqa"}
N_CHOICES = {"piqa": 2, "siqa": 3, "hellaswag": 4, "winogrande": 2, "arc_easy": 4, "arc_challenge": 4, "openbookqa": 4}


@pytest.fixture
def commonsense_dir(tmp_path: Path) -> Path:
    """Every task's train.json and test.json, plus PIQA's original valid.jsonl + labels."""
    root = tmp_path / "commonsense"
    for folder in FOLDERS.values():
        (root / folder).mkdir(parents=True)
        for split, n in (("train", 16), ("test", 6)):
            items = [llm_adapters_item(folder, i) for i in range(n)]
            (root / folder / f"{split}.json").write_text(json.dumps(items, indent=4), encoding="utf-8")
    original = root / "piqa" / "original"
    original.mkdir()
    rows = [{"goal": GOALS[i % 3], "sol1": SOLUTIONS[i % 3][i % 2], "sol2": SOLUTIONS[i % 3][1 - i % 2]} for i in range(6)]
    (original / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (original / "valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(6)), encoding="utf-8")
    return root
