"""Causal-LM mode (``model.kind: causal_lm``): instruction tuning and log-likelihood scoring
of each choice, in one of two prompt formats (``task.prompt_format``):

- ``llm_adapters`` (default), described below;
- ``lm_eval``: lm-evaluation-harness's own prompt and choice texts per task
  (:mod:`experiments.prompts`); training appends the gold continuation and EOS to the context.

Training rows take the layout of LLM-Adapters' ``commonsense_170k.json`` (``instruction``,
``input`` (empty), ``output`` = "the correct answer is <key>", ``answer`` = <key>), built from
each task's training split: a local LLM-Adapters file keeps its instruction verbatim, hub rows
get one from the task's ``instruction`` block. Each row is rendered with the Alpaca prompt that
LLM-Adapters uses, followed by the output and EOS; the loss covers the output tokens only.
A mixture task (``task.mix``: the names of other tasks) trains on the union of its members'
training rows and evaluates each member on its own evaluation split.

Evaluation scores each choice k by the log-likelihood of "the correct answer is <key_k>" after
the prompt, as lm-evaluation-harness scores continuations (``lm_eval/models/huggingface.py``
``_encode_pair``: the context's trailing spaces move to the continuation, and the
continuation's tokens are those of context + continuation past the context's own):
``accuracy`` from the summed log-probability, ``accuracy_norm`` from that sum divided by the
``len()`` of the choice text (lm-eval's acc_norm; here the whole response). The values are
lm-eval's, but each distinct context is computed once, its choices packed after it in one
forward row (:func:`continuation_loglikelihoods`). Restricting the
answer to the valid keys is the log-likelihood counterpart of LLM-Adapters' generate-then-parse
evaluation. A prompt longer than ``task.max_length`` fails the run with the count it would cut,
before any training, unless ``task.allow_truncation`` (then it loses its start, and
results.json counts the truncated rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import datasets
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.config import PromptFormat, task_config
from experiments.data import count_truncated, task_rows
from experiments.metrics import compute_metrics
from experiments.prompts import ChoiceRequests, lm_eval_requests

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
RESPONSE = "the correct answer is {key}"
IGNORE = -100  # label of the tokens outside the loss


def answer_keys(task: Any, n_choices: int) -> list[str]:
    """The answer keys of a row: ``solution1``, ``answer2``... or the label names (BoolQ's true/false)."""
    if task.task_type == "multiple_choice":
        word = task.instruction.choice_word
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
    intro = task.instruction.intro
    if not intro:
        raise ValueError(f"task {task.name}: the causal-LM mode needs task.instruction.intro for rows without an instruction")
    if task.task_type == "multiple_choice":
        word = task.instruction.choice_word
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


def llm_adapters_requests(task: Any, rows: Iterable[dict[str, Any]]) -> list[ChoiceRequests]:
    """Per row: the Alpaca prompt of its instruction, "the correct answer is <key>" per choice."""
    return [
        ChoiceRequests(
            [PROMPT.format(instruction=r["instruction"])] * len(r["keys"]),
            [RESPONSE.format(key=key) for key in r["keys"]],
            [len(RESPONSE.format(key=key)) for key in r["keys"]],
            r["label"],
        )
        for r in instruction_records(task, rows)
    ]


def choice_requests(task: Any, rows: Iterable[dict[str, Any]]) -> list[ChoiceRequests]:
    """The rows' scoring requests in the task's prompt format."""
    if task.prompt_format == PromptFormat.lm_eval:
        return [lm_eval_requests(task, row) for row in rows]
    return llm_adapters_requests(task, rows)


def member_tasks(task: DictConfig) -> list[DictConfig]:
    """The tasks a run trains and evaluates on: the mixture's members, or the task itself.
    Members take the mixture's length, truncation, prompt format and sample limits."""
    if not task.mix:
        return [task]
    keys = ("max_length", "allow_truncation", "prompt_format", "max_train_samples", "max_eval_samples")
    return [OmegaConf.merge(task_config(name), {k: task[k] for k in keys}) for name in task.mix]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval's ``_encode_pair`` makes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    own = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[: len(own)], whole[len(own) :]


def fit(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """The context cut from the left so that context + continuation fit ``max_length``."""
    keep = max(0, max_length - len(continuation))
    return context[max(0, len(context) - keep) :]


def encode_training(requests: list[ChoiceRequests], tokenizer: Any, max_length: int) -> tuple[datasets.Dataset, list[int]]:
    """Gold context + continuation + EOS, labels only on continuation + EOS; a long context
    loses its start. Also each row's untruncated length."""
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    lengths = []
    for request in requests:
        prompt, response = encode_pair(tokenizer, request.contexts[request.label], request.continuations[request.label])
        response = response + [tokenizer.eos_token_id]
        lengths.append(len(prompt) + len(response))
        prompt = fit(prompt, response, max_length)
        columns["input_ids"].append(prompt + response)
        columns["attention_mask"].append([1] * (len(prompt) + len(response)))
        columns["labels"].append([IGNORE] * len(prompt) + response)
    return datasets.Dataset.from_dict(columns), lengths


def training_set(
    members: list[DictConfig], data_dir: Any, cache_dir: Any, tokenizer: Any, seed: int
) -> tuple[datasets.Dataset, dict[str, int]]:
    """The members' training rows in their prompt format, tokenized, shuffled together; and
    the rows cut per ``<task>/<split>`` (:func:`count_truncated`: fails before training)."""
    parts, truncated = [], {}
    for task in members:
        split = task_rows(task, task.train_split, data_dir, cache_dir, seed)
        encoded, lengths = encode_training(choice_requests(task, split), tokenizer, task.max_length)
        truncated[f"{task.name}/{task.train_split}"] = count_truncated(task, task.train_split, lengths)
        parts.append(encoded)
    return datasets.concatenate_datasets(parts).shuffle(seed=seed), truncated


@dataclass
class EvalSet:
    """One evaluation split of a member, tokenized before training (so that a prompt too
    long fails the run before it trains)."""

    task: DictConfig
    split: str
    suffix: str  # metric suffix of an extra split ("" for the evaluation split)
    requests: list[ChoiceRequests]
    pairs: list[tuple[int, int, list[int], list[int]]]  # (row, choice, context ids, continuation ids), fitted
    truncated: int


def eval_set(task: DictConfig, split: str, suffix: str, rows: Iterable[dict[str, Any]], tokenizer: Any) -> EvalSet:
    """The rows' requests in the task's prompt format, tokenized and fitted to ``task.max_length``."""
    requests = choice_requests(task, rows)
    pairs, row_lengths = [], [0] * len(requests)
    for i, request in enumerate(requests):
        for k, (context, continuation) in enumerate(zip(request.contexts, request.continuations)):
            context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
            row_lengths[i] = max(row_lengths[i], len(context_ids) + len(continuation_ids))
            pairs.append((i, k, fit(context_ids, continuation_ids, task.max_length), continuation_ids))
    return EvalSet(task, split, suffix, requests, pairs, count_truncated(task, split, row_lengths))


def evaluation_sets(members: list[DictConfig], data_dir: Any, cache_dir: Any, tokenizer: Any, seed: int) -> list[EvalSet]:
    """Every member's evaluation splits (the evaluation split, then ``extra_eval_splits``)."""
    return [
        eval_set(task, split, suffix, task_rows(task, split, data_dir, cache_dir, seed), tokenizer)
        for task in members
        for split, suffix in {task.eval_split: "", **task.extra_eval_splits}.items()
    ]


def choice_loglikelihoods(model: torch.nn.Module, tokenizer: Any, eval_set: EvalSet, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row and choice (``-inf`` past a row's choices): the summed log-probability of the
    continuation after its context, and acc_norm's divisor (``len()`` of the choice text)."""
    requests = eval_set.requests
    n_choices = max(len(r.contexts) for r in requests)
    scores = np.full((len(requests), n_choices), -np.inf)
    lengths = np.ones((len(requests), n_choices))
    for i, request in enumerate(requests):
        lengths[i, : len(request.norm_lengths)] = request.norm_lengths
    values = continuation_loglikelihoods(model, tokenizer.pad_token_id, [(p, c) for _, _, p, c in eval_set.pairs], batch_size)
    for (i, k, _, _), value in zip(eval_set.pairs, values):
        scores[i, k] = value
    return scores, lengths


@dataclass
class ContextGroup:
    """One forward row: a context followed by each of its distinct continuations, every
    continuation attending to the context and to its own earlier tokens only, at the positions
    it would have after the context alone."""

    context: tuple[int, ...]
    continuations: list[tuple[int, ...]]

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(x) for x in self.continuations)


def context_groups(requests: list[tuple[list[int], list[int]]]) -> list[ContextGroup]:
    """The distinct continuations of each distinct context, longest row first."""
    by_context: dict[tuple[int, ...], dict[tuple[int, ...], None]] = {}
    for context, continuation in requests:
        by_context.setdefault(tuple(context), {})[tuple(continuation)] = None
    groups = [ContextGroup(context, list(continuations)) for context, continuations in by_context.items()]
    return sorted(groups, key=lambda g: (-g.length, g.context))


def packed_batch(groups: list[ContextGroup], pad_id: int, additive_dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """The rows of ``groups`` right-padded to the longest: ``input_ids``, ``position_ids``, the
    4-D ``attention_mask`` (boolean; for eager attention additive in ``additive_dtype``, 0
    where attended), the ``keep`` positions whose logits are needed, and per continuation
    token its (row, position that predicts it, token id)."""
    width = max(g.length for g in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    positions = torch.zeros_like(ids)
    segments = torch.full_like(ids, -1)  # 0: context, k: continuation k, -1: padding
    keep = torch.zeros_like(ids, dtype=torch.bool)
    rows, predictors, targets = [], [], []
    for b, group in enumerate(groups):
        n = len(group.context)
        ids[b, :n], positions[b, :n], segments[b, :n] = torch.tensor(group.context), torch.arange(n), 0
        keep[b, n - 1] = True
        start = n
        for k, continuation in enumerate(group.continuations, 1):
            end = start + len(continuation)
            ids[b, start:end], positions[b, start:end], segments[b, start:end] = torch.tensor(continuation), torch.arange(n, n + len(continuation)), k
            keep[b, start : end - 1] = True
            rows += [b] * len(continuation)
            predictors += [n - 1, *range(start, end - 1)]  # token t is predicted at the position before it
            targets += continuation
            start = end
    index = torch.arange(width)
    causal_order = index[None, :, None] >= index[None, None, :]
    same = (segments[:, None, :] == 0) | (segments[:, None, :] == segments[:, :, None])
    allowed = (causal_order & same & (segments[:, :, None] >= 0)) | torch.eye(width, dtype=torch.bool)  # padding sees itself
    mask = allowed[:, None]
    if additive_dtype is not None:
        mask = torch.zeros(mask.shape, dtype=additive_dtype).masked_fill(~mask, torch.finfo(additive_dtype).min)
    return {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "keep": keep,
            "rows": torch.tensor(rows), "predictors": torch.tensor(predictors), "targets": torch.tensor(targets)}


@torch.no_grad()
def continuation_loglikelihoods(
    model: torch.nn.Module, pad_id: int, requests: list[tuple[list[int], list[int]]], batch_size: int
) -> list[float]:
    """The summed log-probability of each continuation after its context (token ids), as
    lm-evaluation-harness computes it with one forward per (context + continuation), but with
    each distinct context computed once: a forward row holds a context and all its distinct
    continuations (:class:`ContextGroup`), rows sorted longest first and padded (right) to
    their batch's longest, the LM head applied only where a continuation token is predicted
    (``logits_to_keep``: a boolean mask per row)."""
    if any(not context for context, _ in requests):
        raise ValueError("continuation_loglikelihoods: every request needs a non-empty context")
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"continuation_loglikelihoods: scoring needs the sdpa or eager attention (a custom 4-D mask), not {attention!r}")
    groups = context_groups(requests)
    results: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}
    device = next(model.parameters()).device
    additive_dtype = next(model.parameters()).dtype if attention == "eager" else None
    was_training = model.training
    model.eval()
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        batch = packed_batch(chunk, pad_id, additive_dtype)
        keep = batch["keep"]
        logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device), logits_to_keep=keep.to(device)).logits
        logprobs = torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
        kept_index = (keep.flatten().cumsum(0) - 1).view(keep.shape)  # (row, position) -> row of ``logprobs``
        picked = logprobs[kept_index[batch["rows"], batch["predictors"]].to(device), batch["targets"].to(device)].cpu()
        sums = iter(picked.split([len(x) for g in chunk for x in g.continuations]))
        for group in chunk:
            for continuation in group.continuations:
                results[(group.context, continuation)] = next(sums).sum().item()
    model.train(was_training)
    return [results[(tuple(c), tuple(x))] for c, x in requests]


def evaluate(
    model: torch.nn.Module, tokenizer: Any, eval_sets: list[EvalSet], batch_size: int
) -> tuple[dict[str, float], int, dict[str, int]]:
    """``accuracy`` / ``accuracy_norm`` of every evaluation set (the extra splits' metrics take
    their suffix, a mixture's members their name); ``main`` is the accuracy, the mean over
    members for a mixture. Also the rows of the members' evaluation splits, and the rows
    scored per ``<task>/<split>``."""
    metrics: dict[str, float] = {}
    samples: dict[str, int] = {}
    mains, n_eval = [], 0
    several = len({s.task.name for s in eval_sets}) > 1
    for eval_set in eval_sets:
        scores, lengths = choice_loglikelihoods(model, tokenizer, eval_set, batch_size)
        labels = np.array([r.label for r in eval_set.requests])
        values = {
            "accuracy": compute_metrics("accuracy", scores, labels)["accuracy"],
            "accuracy_norm": compute_metrics("accuracy", scores / lengths, labels)["accuracy"],
        }
        tail = "".join(f"_{part}" for part in (eval_set.suffix, eval_set.task.name if several else "") if part)
        metrics.update({f"{k}{tail}": v for k, v in values.items()})
        samples[f"{eval_set.task.name}/{eval_set.split}"] = len(eval_set.requests)
        if not eval_set.suffix:
            mains.append(values["accuracy"])
            n_eval += len(eval_set.requests)
    metrics["main"] = float(np.mean(mains))
    return metrics, n_eval, samples
