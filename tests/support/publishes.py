"""Which messages this process published, by task name (Celery's ``after_task_publish``).

A check that "nothing was sent" must not read a queue that a worker drains
at the same time: it asks the publisher instead. Use it with its control (a
valid call is seen), so the check can fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import signals


@contextmanager
def recorded_publishes() -> Iterator[list[str]]:
    """The task names published while the block runs, in order."""
    names: list[str] = []

    def record(sender: Any = None, **_: Any) -> None:
        names.append(str(sender))

    signals.after_task_publish.connect(record, weak=False)
    try:
        yield names
    finally:
        signals.after_task_publish.disconnect(record)


@contextmanager
def recorded_messages() -> Iterator[list[tuple[str, Any]]]:
    """(task id, priority) of each message about to be published while the block runs, in order."""
    messages: list[tuple[str, Any]] = []

    def record(headers: Any = None, properties: Any = None, **_: Any) -> None:
        messages.append((str((headers or {}).get("id")), (properties or {}).get("priority")))

    signals.before_task_publish.connect(record, weak=False)
    try:
        yield messages
    finally:
        signals.before_task_publish.disconnect(record)
