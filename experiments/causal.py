"""Causal-LM mode (``model.kind: causal_lm``): instruction tuning in the LLM-Adapters format
and log-likelihood scoring of each choice.

Training rows take the layout of LLM-Adapters' ``commonsense_170k.json`` (``instruction``,
``input`` (empty), ``output`` = "the correct answer is <key>", ``answer`` = <key>), built from
each task's training split: a local LLM-Adapters file keeps its instruction verbatim, hub rows
get one from the task's ``instruction`` block. Each row is rendered with the Alpaca prompt that
LLM-Adapters uses, followed by the output and EOS; the loss covers the output tokens only.
A mixture task (``task.mix``: the names of other tasks) trains on the union of its members'
training rows and evaluates each member on its own evaluation split.

Evaluation scores each choice k by the log-likelihood of "the correct answer is <key_k>" after
the prompt, as lm-evaluation-harness scores continuations: ``accuracy`` from the summed
log-probability, ``accuracy_norm`` from that sum divided by the continuation's length in
characters (lm-eval's acc_norm). Restricting the answer to the valid keys is the
log-likelihood counterpart of LLM-Adapters' generate-then-parse evaluation.
"""

from __future__ import annotations

from typing import Any, Iterable

import datasets
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.config import task_config
from experiments.data import task_rows
from experiments.metrics import compute_metrics

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
RESPONSE = "the correct answer is {key}"
IGNORE = -100  # label of the tokens outside the loss


def answer_keys(task: Any, n_choices: int) -> list[str]:
    """The answer keys of a row: ``solution1``, ``answer2``... or the label names (BoolQ's true/false)."""
    if task.task_type == "multiple_choice":
        word = task.instruction.get("choice_word")
        if not word:
            raise ValueError(f"task {task.name}: the causal-LM mode needs task.instruction.choice_word (Answer, Option...)")
        return [f"{word.lower()}{k + 1}" for k in range(n_choices)]
    if not task.label_names:
        raise ValueError(f"task {task.name} is a regression task: the causal-LM mode scores a set of choices, and it has none")
    return list(task.label_names)


def label_column(task: Any) -> str:
    return "label" if task.task_type == "multiple_choice" else task.label_field


def instruction_text(task: Any, row: dict[str, Any], keys: list[str]) -> str:
    """The row's LLM-Adapters instruction: its own (local files), else built like theirs."""
    if row.get("instruction"):
        return row["instruction"]
    intro = task.instruction.get("intro")
    if not intro:
        raise ValueError(f"task {task.name}: the causal-LM mode needs task.instruction.intro for rows without an instruction")
    if task.task_type == "multiple_choice":
        word = task.instruction["choice_word"]
        listed = " ".join(f"{word}{k + 1}: {choice}" for k, choice in enumerate(row["choices"]))
        body = f"{row['context']}\n\n{listed}"
    else:
        body = " ".join(row[f] for f in task.text_fields if row[f])
    return f"{intro}: {body}\n\nAnswer format: {'/'.join(keys)}"


def instruction_records(task: Any, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a split in the commonsense_170k layout, plus every answer key and the gold index."""
    records = []
    for row in rows:
        keys = answer_keys(task, len(row["choices"]) if task.task_type == "multiple_choice" else 0)
        label = int(row[label_column(task)])
        records.append(
            {
                "instruction": instruction_text(task, row, keys),
                "input": "",
                "output": RESPONSE.format(key=keys[label]),
                "answer": keys[label],
                "keys": keys,
                "label": label,
            }
        )
    return records


def member_tasks(task: DictConfig) -> list[DictConfig]:
    """The tasks a run trains and evaluates on: the mixture's members, or the task itself.
    Members take the mixture's length and sample limits."""
    if not task.mix:
        return [task]
    limits = {k: task[k] for k in ("max_length", "max_train_samples", "max_eval_samples")}
    return [OmegaConf.merge(task_config(name), limits) for name in task.mix]


def encode_training(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> datasets.Dataset:
    """Prompt + output + EOS, labels only on output + EOS; a long prompt loses its start."""
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for record in records:
        prompt = tokenizer(PROMPT.format(instruction=record["instruction"]), add_special_tokens=False)["input_ids"]
        response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt = prompt[max(0, len(prompt) + len(response) - max_length) :]
        columns["input_ids"].append(prompt + response)
        columns["attention_mask"].append([1] * (len(prompt) + len(response)))
        columns["labels"].append([IGNORE] * len(prompt) + response)
    return datasets.Dataset.from_dict(columns)


def training_set(members: list[DictConfig], data_dir: Any, cache_dir: Any, tokenizer: Any, seed: int) -> datasets.Dataset:
    """The members' training rows in the instruction format, tokenized, shuffled together."""
    records = []
    for task in members:
        split = task_rows(task, task.train_split, data_dir, cache_dir, seed)
        records += instruction_records(task, split)
    max_length = max(task.max_length for task in members)
    return encode_training(records, tokenizer, max_length).shuffle(seed=seed)


@torch.no_grad()
def choice_loglikelihoods(
    model: torch.nn.Module, tokenizer: Any, records: list[dict[str, Any]], max_length: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row and choice (``-inf`` past a row's choices): the summed log-probability of the
    choice's response after the prompt, and its length in characters."""
    pairs = []  # (row, choice, prompt ids, continuation ids)
    for i, record in enumerate(records):
        prompt = tokenizer(PROMPT.format(instruction=record["instruction"]), add_special_tokens=False)["input_ids"]
        for k, key in enumerate(record["keys"]):
            continuation = tokenizer(RESPONSE.format(key=key), add_special_tokens=False)["input_ids"]
            pairs.append((i, k, prompt[max(0, len(prompt) + len(continuation) - max_length) :], continuation))
    n_choices = max(len(r["keys"]) for r in records)
    scores = np.full((len(records), n_choices), -np.inf)
    lengths = np.ones((len(records), n_choices))
    values = continuation_loglikelihoods(model, tokenizer.pad_token_id, [(p, c) for _, _, p, c in pairs], batch_size)
    for (i, k, _, _), value in zip(pairs, values):
        scores[i, k] = value
        lengths[i, k] = len(RESPONSE.format(key=records[i]["keys"][k]))
    return scores, lengths


@torch.no_grad()
def continuation_loglikelihoods(
    model: torch.nn.Module, pad_id: int, requests: list[tuple[list[int], list[int]]], batch_size: int
) -> list[float]:
    """The summed log-probability of each continuation after its context (token ids), as
    lm-evaluation-harness computes it, with its batching: one forward per distinct
    context + continuation sequence, the sequences sorted longest first so each batch pads
    (right) to its own longest, and the LM head applied at the continuation positions only
    (``logits_to_keep``: a boolean mask per row)."""
    if any(not context for context, _ in requests):
        raise ValueError("continuation_loglikelihoods: every request needs a non-empty context")
    distinct = sorted({(tuple(c + x), len(c)) for c, x in requests}, key=lambda s: (-len(s[0]), s))
    results: dict[tuple[tuple[int, ...], int], float] = {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start : start + batch_size]
        width = len(chunk[0][0])
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        keep = torch.zeros_like(ids, dtype=torch.bool)  # token t is predicted at position t - 1
        for j, (sequence, context) in enumerate(chunk):
            ids[j, : len(sequence)] = torch.tensor(sequence)
            mask[j, : len(sequence)] = 1
            keep[j, context - 1 : len(sequence) - 1] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device)).logits
        targets = ids[:, 1:][keep[:, :-1]].to(device)
        logprobs = torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for (sequence, context), row_logprobs in zip(chunk, logprobs.split([len(s) - c for s, c in chunk])):
            results[(sequence, context)] = row_logprobs.sum().item()
    model.train(was_training)
    return [results[(tuple(c + x), len(c))] for c, x in requests]


def evaluate(
    model: torch.nn.Module, tokenizer: Any, members: list[DictConfig], data_dir: Any, cache_dir: Any, batch_size: int, seed: int
) -> tuple[dict[str, float], int, dict[str, int]]:
    """``accuracy`` / ``accuracy_norm`` of every member's evaluation splits (the extra splits'
    metrics take their suffix, a mixture's members their name); ``main`` is the accuracy, the
    mean over members for a mixture. Also the rows of the members' evaluation splits, and the
    rows scored per ``<task>/<split>``."""
    metrics: dict[str, float] = {}
    samples: dict[str, int] = {}
    mains, n_eval = [], 0
    for task in members:
        for split, suffix in {task.eval_split: "", **task.extra_eval_splits}.items():
            ds = task_rows(task, split, data_dir, cache_dir, seed)
            records = instruction_records(task, ds)
            scores, lengths = choice_loglikelihoods(model, tokenizer, records, task.max_length, batch_size)
            labels = np.array([r["label"] for r in records])
            values = {
                "accuracy": compute_metrics("accuracy", scores, labels)["accuracy"],
                "accuracy_norm": compute_metrics("accuracy", scores / lengths, labels)["accuracy"],
            }
            tail = "".join(f"_{part}" for part in (suffix, task.name if len(members) > 1 else "") if part)
            metrics.update({f"{k}{tail}": v for k, v in values.items()})
            samples[f"{task.name}/{split}"] = len(records)
            if not suffix:
                mains.append(values["accuracy"])
                n_eval += len(records)
    metrics["main"] = float(np.mean(mains))
    return metrics, n_eval, samples
