"""Bulk dispatch: many calls of one task in one go (``task.delay_many([...])``).

A loop of ``.delay()`` pays, per message, a producer taken from the pool and
a round trip to the broker. ``dispatch_many`` checks every call first (all or
nothing: a bad call sends none), then hands every message to ``publish_many``
(the one send path), which sends them through one producer connection and,
where the transport supports it (kombu's ``Producer.batch``: Redis), one
pipeline per ``batch_size`` messages.

Arguments that are not JSON-serializable are found while sending: on Redis
the pipeline holding such an argument is discarded (earlier pipelines are
sent); elsewhere the calls before it are sent, as a loop would send them.
What it does not do: custom task ids (deduplication is per call; use
``.apply_async(task_id=...)``), and publishing atomically (a broker failure
halfway leaves the first messages sent, as a loop would).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from celery.result import AsyncResult

from ..exceptions import TaskArgumentError
from .publish import DEFAULT_BATCH_SIZE, Message, publish_many

if TYPE_CHECKING:
    from ..base import BaseTask

# Options a bulk call refuses: each names one message, not many.
_PER_CALL_OPTIONS = ("task_id", "args", "kwargs", "producer", "connection")


def dispatch_many(
    task: BaseTask[Any, Any],
    calls: Iterable[Mapping[str, Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **options: Any,
) -> list[AsyncResult[Any]]:
    """Send one message of ``task`` per keyword-argument mapping in ``calls``.

    ``options`` (``countdown``, ``queue``, ``priority``, ``expires``...) apply
    to every message. Returns the results in the order of ``calls``.
    """
    refused = [name for name in _PER_CALL_OPTIONS if name in options]
    if refused:
        raise TaskArgumentError(f"{task.name}: delay_many() does not take {', '.join(refused)}")
    if batch_size < 1:
        raise TaskArgumentError(f"{task.name}: batch_size must be at least 1")
    messages = [Message(task, (), dict(kwargs), options=options) for kwargs in calls]
    return publish_many(task.app, messages, batch_size=batch_size)
