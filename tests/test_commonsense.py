"""Commonsense tasks: the LLM-Adapters JSON files, PIQA's original JSONL, the hub's parquet
schema, multiple-choice batching, encoder runs of every method on a multiple-choice task, and
the causal-LM mode (instruction format, log-likelihood scoring, the task mixture)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import N_CHOICES, fast_configs, llm_adapters_item, slow_except
from experiments.causal import PROMPT, choice_loglikelihoods, encode_training, eval_set, instruction_records
from experiments.prompts import ChoiceRequests
from experiments.config import compose
from experiments.data import DataError, MultipleChoiceCollator, choice_pair, load_split, tokenize
from experiments.methods import load_methods
from experiments.metrics import compute_metrics
from experiments.models import load_model, load_tokenizer
from experiments.runner import run

@pytest.fixture
def cs_cfg(commonsense_dir: Path, tmp_path: Path) -> Callable[..., object]:
    """A config for a fast run on model=tiny over the tiny commonsense folder."""
    return fast_configs(commonsense_dir, tmp_path / "runs")


@pytest.mark.parametrize("task", sorted(N_CHOICES))
def test_llm_adapters_multiple_choice(commonsense_dir: Path, task: str) -> None:
    cfg = compose([f"task={task}"]).task
    ds = load_split(cfg, cfg.eval_split, str(commonsense_dir))
    assert len(ds) == 6 and ds["label"] == [0, 1, 0, 1, 0, 1]  # "solution1" -> choice 0
    assert ds[0]["context"] in ("How do I open a jar?", "Sarah helped Maria so _ said thanks.")
    assert ds[0]["choices"][:2] == ["Twist the lid.", "Bake the jar."] and len(ds[0]["choices"]) == N_CHOICES[task]
    assert ds[0]["instruction"].startswith("Please choose the correct")


def test_arc_keeps_a_fifth_choice(commonsense_dir: Path) -> None:
    ds = load_split(compose(["task=arc_easy"]).task, "test", str(commonsense_dir))
    assert [len(c) for c in ds["choices"][:3]] == [4, 5, 4] and ds[1]["choices"][4] == "a fifth choice"


def test_boolq_question_and_labels(commonsense_dir: Path) -> None:
    ds = load_split(compose(["task=boolq"]).task, "validation", str(commonsense_dir))
    assert ds["answer"] == [1, 0, 1, 0, 1, 0]  # true=1, as the hub's bool
    assert ds[0]["question"] == "is how do i open a jar?" and ds[0]["passage"] == ""


def test_piqa_original_jsonl_with_label_file(commonsense_dir: Path) -> None:
    cfg = compose(["task=piqa", "task.files.validation=original/valid.jsonl"]).task
    ds = load_split(cfg, "validation", str(commonsense_dir))
    assert ds["label"] == [0, 1, 0, 1, 0, 1] and ds[1]["choices"] == ["Freeze them.", "Stuff them with paper."]


def test_hub_parquet_schemas(tmp_path: Path) -> None:
    arc = tmp_path / "ARC-Easy"
    arc.mkdir()
    pd.DataFrame({
        "id": ["q1", "q2"], "question": ["Which is hot?", "Which is cold?"],
        "choices": [{"text": ["ice", "fire", "snow"], "label": ["A", "B", "C"]}, {"text": ["ice", "fire"], "label": ["1", "2"]}],
        "answerKey": ["B", "1"],
    }).to_parquet(arc / "test-00000-of-00001.parquet")
    ds = load_split(compose(["task=arc_easy"]).task, "test", str(tmp_path))
    assert ds["label"] == [1, 0] and ds[0]["choices"] == ["ice", "fire", "snow"] and ds[1]["context"] == "Which is cold?"
    siqa = tmp_path / "social_i_qa"
    siqa.mkdir()
    frame = pd.DataFrame({"context": ["Kai ran."], "question": ["Why?"], "answerA": ["late"], "answerB": ["fun"], "answerC": ["no"], "label": ["2"]})
    frame.to_parquet(siqa / "validation-00000-of-00001.parquet")
    ds = load_split(compose(["task=siqa"]).task, "validation", str(tmp_path))
    assert ds[0] == {"context": "Kai ran. Why?", "choices": ["late", "fun", "no"], "label": 1}
    frame.assign(label=["4"]).to_parquet(siqa / "validation-00000-of-00001.parquet")
    with pytest.raises(DataError, match="label '4' names none of its 3 choices"):
        load_split(compose(["task=siqa"]).task, "validation", str(tmp_path))


def test_bad_answer_names_the_item(commonsense_dir: Path) -> None:
    path = commonsense_dir / "piqa" / "test.json"
    items = json.loads(path.read_text())
    items[2]["answer"] = "solution3"
    path.write_text(json.dumps(items))
    with pytest.raises(DataError, match=r"test\.json: item 2: answer 'solution3' names none of its 2 choices"):
        load_split(compose(["task=piqa"]).task, "validation", str(commonsense_dir))


def test_collator_keeps_choices_with_their_example(commonsense_dir: Path) -> None:
    cfg = compose(["model=tiny", "task=arc_easy"])
    tokenizer = load_tokenizer(cfg.model)
    ds = tokenize(load_split(cfg.task, "test", str(commonsense_dir)), cfg.task, tokenizer)
    batch = MultipleChoiceCollator(tokenizer)([ds[0], ds[1]])
    assert batch["input_ids"].shape[:2] == (2, 5) and batch["labels"].tolist() == [0, 1]
    for row in range(2):
        for choice in range(len(ds[row]["input_ids"])):
            ids = batch["input_ids"][row, choice][batch["attention_mask"][row, choice].bool()].tolist()
            assert ids == ds[row]["input_ids"][choice]
    assert torch.equal(batch["input_ids"][0, 4], batch["input_ids"][0, 3])  # the 4-choice row repeats its last
    assert "a fifth choice" in tokenizer.decode(batch["input_ids"][1, 4])


def test_winogrande_choices_fill_the_blank(commonsense_dir: Path) -> None:
    assert choice_pair("Sarah helped Maria so _ said thanks.", "Maria", "_") == ("Sarah helped Maria so Maria", "said thanks.")
    assert choice_pair("no blank here", "x", "_") == ("no blank here", "x")
    cfg = compose(["model=tiny", "task=winogrande"])
    tokenizer = load_tokenizer(cfg.model)
    ds = tokenize(load_split(cfg.task, "validation", str(commonsense_dir)), cfg.task, tokenizer)
    first = tokenizer.decode(ds[0]["input_ids"][0], skip_special_tokens=True)
    assert "_" not in first and "said thanks" in first


def test_multiple_choice_accuracy_by_hand() -> None:
    # per-example scores over 3 choices; a repeated last choice ties and never wins over the first copy
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 2.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    result = compute_metrics("accuracy", logits, np.array([1, 0, 2, 1]))
    assert result["main"] == pytest.approx(0.5)  # predictions 1, 0, 1, 0


SEQ_CLS_ONLY = {"tsqlora"}  # its quality score needs one classification head per example


@pytest.mark.parametrize("method", slow_except(sorted(set(load_methods()) - SEQ_CLS_ONLY), {"taso", "lora", "zero_shot"}))
def test_methods_run_on_multiple_choice(cs_cfg, tmp_path: Path, method: str) -> None:
    results = json.loads(run(cs_cfg(f"method={method}", "task=siqa"), tmp_path / method).read_text())
    trains = load_methods()[method].trains  # method=zero_shot evaluates the model as loaded
    assert results["status"] == "completed" and results["steps"] == (4 if trains else 0)
    assert 0.0 <= results["metrics"]["main"] <= 1.0 and results["eval_samples"] == 6
    assert results["head_params"] == (32 + 1 if trains else 0)  # one score per choice


@pytest.mark.slow
def test_boolq_runs_as_pair_classification(cs_cfg, tmp_path: Path) -> None:
    results = json.loads(run(cs_cfg("method=lora", "task=boolq"), tmp_path / "boolq").read_text())
    assert results["status"] == "completed" and results["head_params"] == 32 * 2 + 2


def test_instruction_records_in_commonsense_170k_layout(commonsense_dir: Path) -> None:
    task = compose(["task=siqa"]).task
    records = instruction_records(task, load_split(task, "validation", str(commonsense_dir)))
    assert records[1]["output"] == "the correct answer is answer2" and records[1]["answer"] == "answer2"
    assert records[1]["keys"] == ["answer1", "answer2", "answer3"] and records[1]["input"] == ""
    hub_row = {"context": "Kai ran. Why?", "choices": ["late", "fun", "no"], "label": 1}
    built = instruction_records(task, [hub_row])[0]["instruction"]  # hub rows get an instruction built like LLM-Adapters'
    assert built == "Please choose the correct answer to the question: Kai ran. Why?\n\nAnswer1: late Answer2: fun Answer3: no\n\nAnswer format: answer1/answer2/answer3"


def test_loss_only_on_answer_tokens() -> None:
    tokenizer = load_tokenizer(compose(["model=tiny-causal"]).model)
    request = ChoiceRequests([PROMPT.format(instruction="Pick one.")] * 2, ["the correct answer is answer1", "the correct answer is answer2"], [1, 1], 0)
    dataset, lengths = encode_training([request], tokenizer, 512)
    row = dataset[0]
    assert lengths == [len(row["input_ids"])]
    answer = [t for t in row["labels"] if t != -100]
    assert tokenizer.decode(answer) == "the correct answer is answer1 [SEP]"
    assert row["labels"][: len(row["labels"]) - len(answer)] == [-100] * (len(row["labels"]) - len(answer))
    assert row["input_ids"][-len(answer):] == answer


def test_loglikelihood_is_the_sum_over_the_continuation() -> None:
    cfg = compose(["model=tiny-causal", "task=piqa"])
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_model(cfg.model, 1, "causal_lm")
    rows = [{"context": "Pick.", "choices": ["a", "b"], "label": 0, "instruction": "Pick."}]
    scores, lengths = choice_loglikelihoods(model, tokenizer, eval_set(cfg.task, "validation", "", rows, tokenizer), 1)
    prompt = tokenizer(PROMPT.format(instruction="Pick."), add_special_tokens=False)["input_ids"]
    continuation = tokenizer("the correct answer is solution2", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + continuation])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    by_hand = sum(logprobs[len(prompt) + t - 1, tok].item() for t, tok in enumerate(continuation))
    assert scores[0, 1] == pytest.approx(by_hand, abs=1e-4) and lengths[0, 1] == len("the correct answer is solution2")


@pytest.mark.slow
def test_trained_preference_ranks_first(cs_cfg, tmp_path: Path) -> None:
    # every training answer of this PIQA copy is solution2: the model learns to prefer it
    folder = Path(cs_cfg().data.dir) / "piqa"
    items = [llm_adapters_item("piqa", 2 * i + 1) for i in range(8)]
    (folder / "train.json").write_text(json.dumps(items))
    (folder / "test.json").write_text(json.dumps(items[:4]))
    cfg = cs_cfg("model=tiny-causal", "task=piqa", "method=full", "trainer.lr=1e-2", "trainer.max_steps=12", "trainer.warmup_ratio=0")
    results = json.loads(run(cfg, tmp_path / "prefer").read_text())
    assert results["metrics"]["accuracy"] == 1.0 and results["metrics"]["accuracy_norm"] == 1.0
    assert results["train_loss_history"][-1]["loss"] < results["train_loss_history"][0]["loss"]


@pytest.mark.parametrize("method", sorted(SEQ_CLS_ONLY))
@pytest.mark.parametrize("overrides", [("task=siqa",), ("model=tiny-causal", "task=piqa")])
def test_seq_cls_only_methods_name_why(cs_cfg, tmp_path: Path, method: str, overrides: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="supports sequence classification only"):
        run(cs_cfg(f"method={method}", *overrides), tmp_path / method)


# BitFit and head_only: tests below and in test_first_run (no bias terms, no new head)
@pytest.mark.parametrize("method", slow_except(sorted(set(load_methods()) - SEQ_CLS_ONLY - {"bitfit", "head_only"}), {"lora"}))
def test_methods_run_on_causal_lm_mixture(cs_cfg, tmp_path: Path, method: str) -> None:
    cfg = cs_cfg("model=tiny-causal", "task=commonsense", "task.mix=[boolq,arc_easy]", f"method={method}", "trainer.max_steps=2")
    results = json.loads(run(cfg, tmp_path / method).read_text())
    metrics = results["metrics"]
    steps = 2 if load_methods()[method].trains else 0  # method=zero_shot evaluates the model as loaded
    assert results["status"] == "completed" and results["steps"] == steps and results["head_params"] == 0
    assert {"accuracy_boolq", "accuracy_norm_boolq", "accuracy_arc_easy", "accuracy_norm_arc_easy"} <= metrics.keys()
    assert metrics["main"] == pytest.approx(np.mean([metrics["accuracy_boolq"], metrics["accuracy_arc_easy"]]))
    assert results["eval_samples"] == 12


def test_bitfit_on_causal_lm_names_why(cs_cfg, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BitFit: no bias"):
        run(cs_cfg("model=tiny-causal", "task=piqa", "method=bitfit"), tmp_path / "bitfit")


def test_mixture_needs_a_causal_lm(cs_cfg, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only a causal LM"):
        run(cs_cfg("task=commonsense", "method=lora"), tmp_path / "mix")


HUB_ROWS = {  # one row per task in the hub dataset's own schema, and what it must read as
    "boolq": ({"question": "is ice cold", "passage": "Ice is frozen water.", "answer": True, "idx": 0}, None),
    "piqa": ({"goal": "Open a jar.", "sol1": "Bake it.", "sol2": "Twist the lid.", "label": 1}, ("Open a jar.", 1, 2)),
    "siqa": ({"context": "Kai ran.", "question": "Why?", "answerA": "late", "answerB": "fun", "answerC": "no", "label": "3"},
             ("Kai ran. Why?", 2, 3)),
    "hellaswag": ({"ctx": "He opens the jar", "endings": ["and eats.", "and flies.", "and sings.", "and sleeps."], "label": "0"},
                  ("He opens the jar", 0, 4)),
    "winogrande": ({"sentence": "Kim fed Pat so _ was full.", "option1": "Kim", "option2": "Pat", "answer": "2"},
                   ("Kim fed Pat so _ was full.", 1, 2)),
    "openbookqa": ({"id": "7", "question_stem": "The sun is", "choices": {"text": ["a star", "a moon", "a rock", "a cloud"],
                    "label": ["A", "B", "C", "D"]}, "answerKey": "A"}, ("The sun is", 0, 4)),
}


@pytest.mark.parametrize("task", sorted(HUB_ROWS))
def test_hub_schema_through_load_dataset(tmp_path: Path, task: str) -> None:
    row, expected = HUB_ROWS[task]
    cfg = compose([f"task={task}", f"task.hub_path={tmp_path}", "task.hub_config=default"]).task  # a local hub-style folder
    pd.DataFrame([row, row]).to_parquet(tmp_path / f"{cfg.eval_split}-00000-of-00001.parquet")
    ds = load_split(cfg, cfg.eval_split, None, cache_dir=str(tmp_path / "cache"))  # the datasets.load_dataset path
    if expected is None:  # BoolQ: the bool answer becomes label id 1 ("true")
        assert ds[0] == {"question": "is ice cold", "passage": "Ice is frozen water.", "answer": 1}
    else:
        context, label, n_choices = expected
        assert (ds[0]["context"], ds[0]["label"], len(ds[0]["choices"])) == (context, label, n_choices)
