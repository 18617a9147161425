"""lm-evaluation-harness's zero-shot prompts for causal LMs (``task.prompt_format=lm_eval``).

lm-eval scores a multiple-choice question as one request per choice: the log-likelihood of
a continuation after a context (``lm_eval/api/task.py``, ``construct_requests``). Normally
the context is ``doc_to_text`` and each continuation is ``target_delimiter`` (" ") + a choice
of ``doc_to_choice``; in WinoGrande's partial scoring (``multiple_input``) each choice fills
the blank inside its own context and the continuation, the rest of the sentence after the
blank, is shared. ``acc`` picks the highest log-likelihood, ``acc_norm`` the highest
log-likelihood divided by ``len()`` of the choice text (``process_results``).

Each task's template is data, in the ``lm_eval`` block of ``conf/task/<task>.yaml`` (written
from the lm-eval task file it cites), over the fields of a row as :mod:`experiments.data`
reads it (``context``, ``choices``, the task's text fields, and ``mc_columns.keep``):

- ``text``: the context, a ``str.format`` template (``"Question: {context}\\nAnswer:"``);
- ``choices``: fixed choice texts (BoolQ's ``[no, yes]``); default: the row's choices;
- ``delimiter``: lm-eval's ``target_delimiter`` (default " ");
- ``capitalize``: fields the template reads ``str.capitalize()``-d (HellaSwag's ``ctx_b``);
- ``clean: wikihow``: HellaSwag's ``preprocess`` on the context and each choice;
- ``partial: true``: WinoGrande's partial scoring around ``task.blank``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from experiments.data import DataError


@dataclass
class ChoiceRequests:
    """One row's requests: a (context, continuation) pair per choice, acc_norm's divisors, the gold index."""

    contexts: list[str]
    continuations: list[str]
    norm_lengths: list[int]
    label: int


def wikihow_clean(text: str) -> str:
    """HellaSwag's ``preprocess`` (lm_eval/tasks/hellaswag/utils.py): strip, WikiHow's
    ``" [title]"`` becomes ``". "``, other bracketed tags are dropped, double spaces halved."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


CLEANERS = {"wikihow": wikihow_clean}


def template_fields(task: Any, row: dict[str, Any]) -> dict[str, str]:
    """The row's fields the template may read, ``capitalize``-d where the template says."""
    fields = {key: value for key, value in row.items() if isinstance(value, str)}
    for name in task.lm_eval.capitalize:
        fields[name] = fields.get(name, "").capitalize()
    return fields


def render(task: Any, fields: dict[str, str]) -> str:
    try:
        return task.lm_eval.text.format(**fields)
    except KeyError as missing:
        raise DataError(
            f"task {task.name}: the lm_eval prompt reads field {missing} that these rows lack "
            f"(they have {sorted(fields)}); the hub's {task.hub_path} rows carry it"
        ) from None


def lm_eval_requests(task: Any, row: dict[str, Any]) -> ChoiceRequests:
    """lm-eval's requests for one row (module docstring)."""
    spec = task.lm_eval
    if not spec.text:
        raise ValueError(f"task {task.name} has no lm_eval prompt (task.lm_eval.text); use task.prompt_format=llm_adapters")
    for name in spec.required:
        if not str(row.get(name, "")).strip():
            raise DataError(f"task {task.name}: the lm_eval prompt needs a non-empty {name!r}, which these rows lack (LLM-Adapters files drop it); use the hub's {task.hub_path}")
    clean = CLEANERS[spec.clean] if spec.clean else (lambda text: text)
    delimiter = spec.delimiter
    label = int(row["label"] if task.task_type == "multiple_choice" else row[task.label_field])
    choices = [clean(str(c)) for c in (spec.choices or row["choices"])]
    if spec.partial:
        sentence = row["context"]
        if task.blank not in sentence:
            raise DataError(f"task {task.name}: sentence without the blank {task.blank!r}: {sentence[:80]!r}")
        cut = sentence.index(task.blank)
        filled = [sentence[:cut] + choice for choice in choices]
        rest = delimiter + sentence[cut + len(task.blank) :].strip()
        return ChoiceRequests(filled, [rest] * len(filled), [len(f) for f in filled], label)
    context = clean(render(task, template_fields(task, row)))
    return ChoiceRequests([context] * len(choices), [delimiter + c for c in choices], [len(c) for c in choices], label)
