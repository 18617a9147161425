"""Training protocols as config: the ``${protocol:<key>}`` resolver.

A protocol (``conf/protocol/<name>.yaml``) holds a recipe's values for every task
(``protocol.shared``) and per task (``protocol.per_task.<task>``, which wins), and points
``trainer`` / ``task`` keys at them, e.g. ``trainer.epochs: ${protocol:epochs}``. The value
is picked for the task being composed, so ``-m task=rte,mrpc`` gets each task's entry and
``--cfg job --resolve`` shows it; a key given on the command line still wins.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def protocol_value(key: str, *, _root_: DictConfig) -> Any:
    """``protocol.per_task[task.name][key]``, else ``protocol.shared[key]``; an error naming
    the protocol, the task and the tasks it has values for when neither is set."""
    protocol, task = _root_.protocol, _root_.task.name
    entry = protocol.per_task.get(task)
    if entry is not None and entry.get(key) is not None:
        return entry[key]
    if protocol.shared.get(key) is not None:
        return protocol.shared[key]
    tasks = ", ".join(sorted(protocol.per_task)) or "none"
    raise ValueError(f"protocol {protocol.name!r} sets no {key!r} for task {task!r} (tasks with values: {tasks})")
