"""Revoking a running async task: its coroutine is cancelled at its next ``await``.

``DELETE /tasks/{id}`` stores ``REVOKED`` in the result backend at once
(``status.record_revoked``) and broadcasts Celery's revoke, which only stops
a task that has not started. A task already running keeps running unless
something tells it: here, while an async body runs longer than
``FIRST_CHECK`` seconds, a watcher on the same event loop reads the task's
state every ``CHECK_INTERVAL`` seconds and, once it is ``REVOKED``, cancels
the asyncio task that runs the body, as a soft time limit does. The body
unwinds at its next await (a ``@db_task`` rolls back and releases its
connection), the run ends with ``TaskCancelledError`` (Celery's ``Ignore``:
the message is acknowledged, the stored ``REVOKED`` stays), and the worker
process and its other tasks go on.

Reading the state works the same in a prefork child, a thread, the asyncio
pool and on any host, where Celery's own revoked set lives only in each
worker's main process. A run shorter than ``FIRST_CHECK`` reads nothing. A
sync body cannot be interrupted this way: Celery's ``terminate`` (a signal
to the process) stays the only way, as documented for the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from celery import Celery, states
from celery.exceptions import Ignore

from ..logging import FRAMEWORK_LOGGER_NAME
from ..registry import registry
from .status import get_task_status, raw_meta, record_revoked

T = TypeVar("T")

_log = logging.getLogger(FRAMEWORK_LOGGER_NAME)

# Seconds before the first reading, and between readings.
FIRST_CHECK = 0.5
CHECK_INTERVAL = 1.0


class TaskCancelledError(Ignore):
    """The task was revoked while it ran: its coroutine was cancelled (``REVOKED`` is stored)."""


class NotCancellableError(Exception):
    """A sync task is running: nothing can stop it short of a signal to its process."""


def revoke(app: Celery, task_id: str) -> str | None:
    """Revoke ``task_id``: queued, it never starts; running async, it is cancelled (blocking).

    Returns the task's state afterwards ("revoked", or the state it finished
    in), or None for an id the backend has never seen. A running sync task
    raises ``NotCancellableError`` and is left alone.
    """
    status = get_task_status(app, task_id)
    if not status.known:
        return None
    if status.finished:
        return status.state
    if status.state in ("started", "progress") and _runs_sync_body(app, task_id):
        # Storing REVOKED would hide a run that goes on to its end.
        raise NotCancellableError(
            f"task {task_id} runs a sync body, which cannot be cancelled at an await; "
            "it runs to its end (Celery's terminate, a signal to its process, is the only stop)"
        )
    app.control.revoke(task_id)
    record_revoked(app, task_id, "revoked by an operator")
    return "revoked"


def _runs_sync_body(app: Celery, task_id: str) -> bool:
    # From the framework's registry, not ``app.tasks``: reading that finalizes
    # an app that is not yet, registering every shared task on it.
    body = registry.body(str((raw_meta(app, task_id) or {}).get("name")))
    return body is not None and not inspect.iscoroutinefunction(body)


def revoked_in_backend(app: Celery, task_id: str) -> bool:
    """Whether the result backend holds ``REVOKED`` for ``task_id`` (a blocking read)."""
    meta = raw_meta(app, task_id)
    if meta is None:
        meta = dict(app.backend.get_task_meta(task_id))
    return meta.get("status") == states.REVOKED


async def cancel_when_revoked(
    body: Coroutine[Any, Any, T], revoked: Callable[[], bool], task_id: str
) -> T:
    """Await ``body``; cancel it and raise ``TaskCancelledError`` once ``revoked()`` says so."""
    running = asyncio.current_task()
    cancelled = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal cancelled
        while True:
            try:
                # The read is blocking (Redis or the database): off the loop.
                if await asyncio.to_thread(revoked):
                    cancelled = True
                    if running is not None:
                        running.cancel()
                    return
            except Exception as exc:  # noqa: BLE001 - the task runs on; the next reading may work
                _log.debug("Could not read whether task %s was revoked: %r", task_id, exc)
            await asyncio.sleep(CHECK_INTERVAL)

    def start_watching() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(watch())

    # A timer, not a task, until the first reading: a short run costs one timer.
    first = asyncio.get_running_loop().call_later(FIRST_CHECK, start_watching)
    try:
        return await body
    except asyncio.CancelledError:
        if not cancelled or running is None:
            raise
        # Ours: the run ends here, as revoked; the task goes on to report it.
        running.uncancel()
        raise TaskCancelledError(f"task {task_id} was revoked while running") from None
    finally:
        first.cancel()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
