"""Bulk dispatch: many calls of one task in one go (``task.delay_many([...])``).

A loop of ``.delay()`` pays, per message, a producer taken from the pool, a
round trip to the broker, and (Redis result backend) a pub/sub SUBSCRIBE so
that ``.get()`` could be told of the result. ``dispatch_many`` checks every
call first (all or nothing: a bad call sends none), then publishes through
one producer connection and, where the transport supports it (kombu's
``Producer.batch``: Redis), one pipeline per ``batch_size`` messages. It does
not subscribe to the results: ``AsyncResult.get()`` subscribes when it is
called and reads a result that is already stored, so nothing is lost.

Arguments that are not JSON-serializable are found while sending, so the
calls before such an argument are sent (as a loop would send them).
What it does not do: custom task ids (deduplication is per call; use
``.apply_async(task_id=...)``), and publishing atomically (a broker failure
halfway leaves the first messages sent, as a loop would).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from celery.result import AsyncResult
from celery.utils import uuid
from kombu.exceptions import EncodeError

from ..exceptions import TaskArgumentError, TaskDispatchError
from ..monitoring import record_dispatch, record_dispatch_failure
from ..operations.status import buffered_sent_records
from .publish import bounded_dispatch

if TYPE_CHECKING:
    from ..base import BaseTask

# Messages per pipeline: large enough to amortise the round trip, small enough
# to keep the client's buffer and the broker's reply modest.
DEFAULT_BATCH_SIZE = 500

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
    prepared = [dict(kwargs) for kwargs in calls]
    for kwargs in prepared:
        task.check_arguments((), kwargs)
    if not prepared:
        return []
    app = task.app
    # The task's own defaults (queue, priority, time limits...), as Celery's send_task uses them.
    task_defaults: dict[str, Any] = getattr(task, "_get_exec_options")()  # noqa: B009 - untyped
    exec_options = {key: value for key, value in task_defaults.items() if value is not None}
    results: list[AsyncResult[Any]] = []
    # The ids of the chunk being sent: not confirmed until its pipeline is.
    unconfirmed: list[str] = []
    try:
        with bounded_dispatch(app, task.name, unconfirmed), app.producer_or_acquire() as producer:
            deferred = bool(getattr(producer, "supports_batch_publish", False))
            for start in range(0, len(prepared), batch_size):
                chunk = prepared[start : start + batch_size]
                # Exits run inner first: the chunk's SENT records are written, then
                # its messages published, so a worker never finds SENT after its
                # own state. Where publishes are not deferred (RabbitMQ), the SENT
                # records are not either.
                sent_records = buffered_sent_records(app) if deferred else contextlib.nullcontext()
                with _pipelined(producer, 2 * len(chunk) + 16), sent_records:
                    for kwargs in chunk:
                        unconfirmed.append(task_id := uuid())
                        results.append(
                            _send_one(task, producer, task_id, kwargs, exec_options, options)
                        )
                unconfirmed.clear()
    except TaskDispatchError as exc:
        queue = str(options.get("queue") or task.background_queue)
        for _ in exc.task_ids:
            record_dispatch_failure(task.name, queue, "raised")
        raise
    return results


def _send_one(
    task: BaseTask[Any, Any],
    producer: Any,
    task_id: str,
    kwargs: dict[str, Any],
    exec_options: Mapping[str, Any],
    options: Mapping[str, Any],
) -> AsyncResult[Any]:
    app = task.app
    amqp = app.amqp
    routed = amqp.router.route(
        {**exec_options, **options},
        task.name,
        (),
        kwargs,
        # The stubs say the class; Celery's own send_task passes the instance.
        task,  # type: ignore[arg-type]
    )
    countdown, eta = routed.pop("countdown", None), routed.pop("eta", None)
    expires = routed.pop("expires", None)
    time_limit = routed.pop("time_limit", None)
    soft_time_limit = routed.pop("soft_time_limit", None)
    try:
        message = amqp.create_task_message(
            task_id, task.name, (), kwargs, countdown, eta, expires=expires,
            reply_to=app.thread_oid, time_limit=time_limit, soft_time_limit=soft_time_limit,
            create_sent_event=app.conf.task_send_sent_event, **routed,
        )  # fmt: skip
        amqp.send_task_message(producer, task.name, message, **routed)
    except EncodeError as exc:
        raise TaskArgumentError(f"{task.name}: arguments must be JSON-serializable: {exc}") from exc
    queue = routed.get("queue") or task.background_queue
    record_dispatch(task.name, str(getattr(queue, "name", queue)))
    return task.AsyncResult(task_id)


def _pipelined(producer: Any, batch_size: int) -> contextlib.AbstractContextManager[Any]:
    """kombu's publish batch (one Redis pipeline) if this kombu has it, else nothing."""
    batch = getattr(producer, "batch", None)
    return batch(max_size=batch_size) if batch is not None else contextlib.nullcontext()
