"""The worker's consumer sends a fresh message of a limited task back before it reaches the pool.

Why: a run that must wait is otherwise found out in a pool process, which
spends a slot of the pool on it (a prefork process, a thread). When one key
floods a queue, the runs it may have hold most slots, and the others would
be left to pass over its backlog one process at a time: a small key's
messages behind that backlog would wait almost as long as the backlog itself.
Screened here, in the consumer that receives every message, the pass costs
no pool slot: a look at the store, the copy sent again, the message
acknowledged (``gate.defer``), a millisecond or so each.

How: Celery builds a handler per task type from the task's ``Strategy``
(``celery.worker.strategy:default``), the documented hook for what happens to
a message between the broker and the pool. ``strategy`` wraps Celery's own
handler for tasks with limits and leaves the others untouched. The screen only
looks (``Admission.screen``): a message it lets through is taken for real by
its run, which defers itself if it lost the race. Messages with a countdown
(retries, deferred copies) are left to the run, as they wait in the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.app.task import Context
from celery.exceptions import Reject
from celery.worker.strategy import default

from ..context import TaskContext
from ..logging import FRAMEWORK_LOGGER_NAME, received_line
from ..observability.hooks import hooks
from .gate import admission, defer

if TYPE_CHECKING:
    from ..base import BaseTask

_log = logging.getLogger(FRAMEWORK_LOGGER_NAME)


def strategy(
    task: BaseTask[Any, Any], app: Any, consumer: Any, **options: Any
) -> Callable[..., Any]:
    """Celery's handler of ``task``'s messages, screened by the task's limits if it has any.

    Its "received" line is at DEBUG unless ``BACKGROUND_LOG_RECEIVED`` (``received_line``).
    """
    handle: Callable[..., Any] = default(
        task, app, consumer, **{"info": received_line(app), **options}
    )
    if task.limits is None:
        return handle

    def screened(
        message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **more: Any
    ) -> Any:
        if _sent_back(task, message):
            return None
        return handle(message, body, ack, reject, callbacks, **more)

    return screened


def _sent_back(task: BaseTask[Any, Any], message: Any) -> bool:
    """True if ``message`` had to wait and was sent again for later (and acknowledged)."""
    headers = dict(message.headers or {})
    if not headers.get("id") or headers.get("eta"):
        return False  # protocol 1, or a countdown: the run decides
    if admission.seems_clear(task):
        return False  # no need to decode it
    try:
        args, kwargs, _embed = message.decode()
        waiting = admission.screen(task, tuple(args), dict(kwargs))
    # Undecidable here (a bad body, arguments the body cannot take, a key that
    # fails, the store): the run decides.
    except Exception:  # noqa: BLE001
        _log.debug("Could not screen a message by its task's limits", exc_info=True)
        return False
    if waiting is None:
        return False
    delivery = message.delivery_info or {}
    args, kwargs = tuple(args), dict(kwargs)
    request = Context(
        headers,
        args=args,
        kwargs=kwargs,
        delivery_info=delivery,
        reply_to=message.properties.get("reply_to"),
        correlation_id=message.properties.get("correlation_id") or headers["id"],
    )
    ctx = TaskContext(
        task_id=str(headers["id"]),
        task_name=task.name,
        attempt=int(headers.get("retries") or 0),
        queue=delivery.get("routing_key") or task.background_queue,
    )
    hooks.on_deferred(ctx, waiting.limit, waiting.key, waiting.wait)
    if isinstance(defer(task, request, ctx, args, kwargs, waiting), Reject):
        return False  # not sent again: the message goes on to the pool, whose run checks again
    message.ack()
    return True
