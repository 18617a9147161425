"""task.prompt_format=lm_eval: lm-evaluation-harness's exact request strings for one row of
each task, its acc_norm divisor, and the scoring of (context, continuation) pairs."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments.causal import choice_loglikelihoods, choice_requests, encode_pair, evaluation_sets
from experiments.config import compose
from experiments.data import DataError, TruncationError, load_split
from experiments.models import load_model, load_tokenizer
from experiments.prompts import wikihow_clean

# one row per task in the hub dataset's schema, and the (context, continuation) pairs lm-eval
# builds from it, written from its task files (lm_eval/tasks/<task>/...; experiments.prompts)
PINNED = {
    "arc_easy": (  # arc/arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text, " " delimiter
        {"id": "1", "question": "Which gas do plants take in?", "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]}, "answerKey": "B"},
        [("Question: Which gas do plants take in?\nAnswer:", " oxygen"), ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
         ("Question: Which gas do plants take in?\nAnswer:", " helium")], 1,
    ),
    "arc_challenge": (
        {"id": "2", "question": "What is 2+2?", "choices": {"text": ["3", "4"], "label": ["1", "2"]}, "answerKey": "2"},
        [("Question: What is 2+2?\nAnswer:", " 3"), ("Question: What is 2+2?\nAnswer:", " 4")], 1,
    ),
    "boolq": (  # super_glue/boolq/default.yaml: "{{passage}}\nQuestion: {{question}}?\nAnswer:", ["no", "yes"]
        {"question": "is ice cold", "passage": "Ice is frozen water.", "answer": True, "idx": 0},
        [("Ice is frozen water.\nQuestion: is ice cold?\nAnswer:", " no"), ("Ice is frozen water.\nQuestion: is ice cold?\nAnswer:", " yes")], 1,
    ),
    "piqa": (  # piqa/piqa.yaml: "Question: {{goal}}\nAnswer:", [sol1, sol2]
        {"goal": "Open a jar.", "sol1": "Bake it.", "sol2": "Twist the lid.", "label": 1},
        [("Question: Open a jar.\nAnswer:", " Bake it."), ("Question: Open a jar.\nAnswer:", " Twist the lid.")], 1,
    ),
    "siqa": (  # siqa/siqa.yaml: "Q: {{context}} {{question}}\nA:", [answerA, answerB, answerC], label - 1
        {"context": "Kai ran to the bus.", "question": "Why did Kai do this?", "answerA": "was late", "answerB": "had fun", "answerC": "slept", "label": "1"},
        [("Q: Kai ran to the bus. Why did Kai do this?\nA:", " was late"), ("Q: Kai ran to the bus. Why did Kai do this?\nA:", " had fun"),
         ("Q: Kai ran to the bus. Why did Kai do this?\nA:", " slept")], 0,
    ),
    "hellaswag": (  # hellaswag/utils.py: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), preprocess(endings)
        {"ind": 4, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill [title] Heat the grill.",
         "ctx_b": "scrub the GRATES", "ctx": "unused", "endings": ["[step] Use a brush.  Then rinse.", "Paint it [substeps] red."],
         "source_id": "wikihow~1", "split": "val", "split_type": "indomain", "label": "0"},
        [("Home and Garden: How to clean a grill. Heat the grill. Scrub the grates", "  Use a brush. Then rinse."),  # a tag's space stays
         ("Home and Garden: How to clean a grill. Heat the grill. Scrub the grates", " Paint it red.")], 0,
    ),
    "winogrande": (  # winogrande/preprocess_winogrande.py: sentence[:idx] + option, " " + sentence[idx + 1:].strip()
        {"sentence": "Kim fed Pat so _ was full.", "option1": "Kim", "option2": "Pat", "answer": "2"},
        [("Kim fed Pat so Kim", " was full."), ("Kim fed Pat so Pat", " was full.")], 1,
    ),
    "openbookqa": (  # openbookqa/openbookqa.yaml: question_stem, choices.text
        {"id": "7", "question_stem": "The sun is", "choices": {"text": ["a star", "a moon", "a rock", "a cloud"], "label": ["A", "B", "C", "D"]},
         "answerKey": "A"},
        [("The sun is", " a star"), ("The sun is", " a moon"), ("The sun is", " a rock"), ("The sun is", " a cloud")], 0,
    ),
}


def hub_task(task: str, tmp_path: Path, *overrides: str):
    """The task's config reading a local hub-style parquet folder (the datasets.load_dataset path)."""
    row = PINNED[task][0]
    cfg = compose([f"task={task}", "task.prompt_format=lm_eval", f"task.hub_path={tmp_path}", "task.hub_config=default", *overrides]).task
    pd.DataFrame([row]).to_parquet(tmp_path / f"{cfg.eval_split}-00000-of-00001.parquet")
    return cfg


@pytest.mark.parametrize("task", sorted(PINNED))
def test_lm_eval_strings_for_one_row_of_each_task(tmp_path: Path, task: str) -> None:
    cfg = hub_task(task, tmp_path)
    rows = load_split(cfg, cfg.eval_split, None, cache_dir=str(tmp_path / "cache"))
    request = choice_requests(cfg, rows)[0]
    _, pairs, label = PINNED[task]
    assert list(zip(request.contexts, request.continuations)) == pairs
    assert request.label == label
    # acc_norm divides by len() of each doc_to_choice text: the choice, or WinoGrande's filled context
    divisors = [len(c) for c, _ in pairs] if task == "winogrande" else [len(cont) - 1 for _, cont in pairs]
    assert request.norm_lengths == divisors


def test_wikihow_clean_is_hellaswag_preprocess() -> None:
    assert wikihow_clean(" Heat it [title] Scrub [step] it.  Done ") == "Heat it. Scrub it. Done"


def test_boolq_lm_eval_needs_the_passage(commonsense_dir: Path) -> None:
    cfg = compose(["task=boolq", "task.prompt_format=lm_eval"]).task
    with pytest.raises(DataError, match="needs a non-empty 'passage'"):
        choice_requests(cfg, load_split(cfg, "validation", str(commonsense_dir)))


def test_llm_adapters_stays_the_default(commonsense_dir: Path) -> None:
    cfg = compose(["task=piqa"]).task
    request = choice_requests(cfg, load_split(cfg, "validation", str(commonsense_dir)))[0]
    assert request.contexts[0].startswith("Below is an instruction") and request.contexts[0].endswith("### Response:\n")
    assert request.continuations == ["the correct answer is solution1", "the correct answer is solution2"]


def test_encode_pair_moves_trailing_space_and_splits_the_joint_encoding() -> None:
    tokenizer = load_tokenizer(compose(["model=tiny-causal"]).model)
    context, continuation = encode_pair(tokenizer, "Question: why?\nAnswer: ", "because")
    assert context == tokenizer("Question: why?\nAnswer:", add_special_tokens=False)["input_ids"]
    assert context + continuation == tokenizer("Question: why?\nAnswer: because", add_special_tokens=False)["input_ids"]


def test_scores_are_the_continuation_log_likelihood_and_acc_norm_divides_by_choice_length(tmp_path: Path) -> None:
    cfg = compose(["model=tiny-causal", "task=arc_easy", "task.prompt_format=lm_eval"])
    task = hub_task("arc_easy", tmp_path)
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_model(cfg.model, 1, "causal_lm")
    (eval_set,) = evaluation_sets([task], None, str(tmp_path / "cache"), tokenizer, 0)
    scores, lengths = choice_loglikelihoods(model, tokenizer, eval_set, batch_size=2)
    context, continuation = encode_pair(tokenizer, "Question: Which gas do plants take in?\nAnswer:", " carbon dioxide")
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([context + continuation])).logits[0], -1)
    by_hand = sum(logprobs[len(context) + t - 1, token].item() for t, token in enumerate(continuation))
    assert scores[0, 1] == pytest.approx(by_hand, abs=1e-4)
    assert list(lengths[0]) == [len("oxygen"), len("carbon dioxide"), len("helium")]
    assert eval_set.truncated == 0


def test_too_long_prompts_fail_with_their_count_unless_allowed(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(compose(["model=tiny-causal"]).model)
    short = hub_task("arc_easy", tmp_path, "task.max_length=8")
    with pytest.raises(TruncationError, match=r"task.max_length=8 would cut 1 of 1 arc_easy test examples \(longest: \d+ tokens\)"):
        evaluation_sets([short], None, str(tmp_path / "cache"), tokenizer, 0)
    allowed = hub_task("arc_easy", tmp_path, "task.max_length=8", "task.allow_truncation=true")
    (eval_set,) = evaluation_sets([allowed], None, str(tmp_path / "cache"), tokenizer, 0)
    assert eval_set.truncated == 1
    assert all(len(context) + len(continuation) <= 8 for _, _, context, continuation in eval_set.pairs)
