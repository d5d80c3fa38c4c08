"""Final failures become dead letters: Celery's failure signals, written to the database.

Celery says when a task failed for good, wherever that is decided:

* ``task_failure``: the run raised and is not retried (the framework's
  classification: non-retriable, retries exhausted, lost runs used up, a soft
  time limit with no retry left), in the process that ran it; and a hard
  time limit, in the worker's main process.
* ``task_unknown``: a message for a task name no module registers.
* ``task_rejected``: a message the worker could not read at all (Celery
  sends nothing for a body it cannot decode: ``RecordingConsumer`` does).

Each becomes one row of ``dead_letters`` (see there), written in its own
transaction on this process's engine, with a bound on how long it may take.
A failure to write is logged with the task's id and changes nothing else:
the task's own outcome is already stored.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celery.worker.consumer import Consumer

from ..event_loop import worker_loop
from ..exceptions import TaskArgumentsRefusedError, TaskProcessLostError, is_retriable
from ..logging import FRAMEWORK_LOGGER_NAME, build_quiet_tracers, mask_url_passwords
from ..registry import FIRST_FAILURE_HEADER
from ..session import database
from ..trace_context import active as tracing_active
from ..trace_context import current as current_trace
from ..trace_context import restored as restored_trace
from ..trace_context import trace_headers
from .dead_letters import (
    DeadLetter,
    DeadLetterStore,
    Reason,
    cut,
    encode_arguments,
)

_log = logging.getLogger(FRAMEWORK_LOGGER_NAME)

# How long recording one dead letter may hold the worker (a database that
# does not answer must not hold a worker slot for the pool's whole timeout).
RECORD_TIMEOUT = 10.0

# Where dead letters go in this process; ``DeadLetterRecorder.store`` by default.
StoreFactory = Callable[[], DeadLetterStore]


def reason_for(exc: BaseException) -> Reason:
    """Why a final failure is final, from its error."""
    if isinstance(exc, TimeLimitExceeded | SoftTimeLimitExceeded):
        return "time limit"
    if isinstance(exc, TaskProcessLostError | WorkerLostError):
        return "worker lost"
    if isinstance(exc, TaskArgumentsRefusedError):
        return "refused"
    return "retries exhausted" if is_retriable(exc) else "non-retriable"


def _error_text(exc: BaseException) -> str:
    return cut(mask_url_passwords(str(exc))) or ""


def _traceback_text(exc: BaseException, einfo: Any = None) -> str | None:
    text = getattr(einfo, "traceback", None)
    if not text and exc.__traceback__ is not None:
        text = "".join(traceback.format_exception(exc))
    return cut(mask_url_passwords(text)) if text else None


class DeadLetterRecorder:
    """Connected to Celery's signals once per process (``celery_app.WorkerSignals``)."""

    def __init__(self, store: StoreFactory | None = None) -> None:
        self._store_factory = store
        self._store: DeadLetterStore | None = None

    def connect(self) -> None:
        signals.task_failure.connect(self.on_task_failure, weak=False)
        signals.task_unknown.connect(self.on_unknown_task, weak=False)
        signals.task_rejected.connect(self.on_rejected_message, weak=False)

    def store(self) -> DeadLetterStore:
        if self._store_factory is not None:
            return self._store_factory()
        engine = database.engine  # this process's (opened on first use)
        if self._store is None or self._store.engine is not engine:
            self._store = DeadLetterStore(engine)
        return self._store

    # -- Celery's signals -----------------------------------------------------

    def on_task_failure(
        self,
        sender: Any = None,
        task_id: str | None = None,
        exception: BaseException | None = None,
        args: Any = None,
        kwargs: Any = None,
        einfo: Any = None,
        **_: Any,
    ) -> None:
        if task_id is None or exception is None:
            return
        request = _request_of(sender, task_id)
        now = time.time()
        # Tracing on: the failed run's span is current here (a replay links to it).
        arguments, complete = encode_arguments(args, kwargs, current_trace())
        first = _header(request, FIRST_FAILURE_HEADER)
        delivery = getattr(request, "delivery_info", None) or {}
        self._record(
            DeadLetter(
                task_id=task_id,
                task_name=str(getattr(sender, "name", None) or "unknown"),
                queue=delivery.get("routing_key") or getattr(sender, "queue", None),
                reason=reason_for(exception),
                arguments=arguments,
                arguments_complete=complete,
                error_type=type(exception).__name__,
                error_module=type(exception).__module__,
                error_message=_error_text(exception),
                traceback=_traceback_text(exception, einfo),
                attempts=int(getattr(request, "retries", None) or 0) + 1,
                worker=getattr(request, "hostname", None) or socket.gethostname(),
                first_failed_at=float(first) if first else now,
                last_failed_at=now,
            )
        )

    def on_unknown_task(
        self,
        sender: Any = None,
        message: Any = None,
        exc: BaseException | None = None,
        name: str | None = None,
        id: str | None = None,
        **_: Any,
    ) -> None:
        error = exc or LookupError(f"no task named {name!r} is registered")
        self._refused(message, error, task_id=id, task_name=name)

    def on_rejected_message(
        self, sender: Any = None, message: Any = None, exc: BaseException | None = None, **_: Any
    ) -> None:
        error = exc or ValueError("the message names no task (not a Celery task message)")
        self._refused(message, error)

    # -- writing ----------------------------------------------------------------

    def _refused(
        self,
        message: Any,
        exc: BaseException,
        task_id: str | None = None,
        task_name: str | None = None,
    ) -> None:
        headers = dict(getattr(message, "headers", None) or {})
        delivery = dict(getattr(message, "delivery_info", None) or {})
        arguments, complete = _message_arguments(message)
        now = time.time()
        self._record(
            DeadLetter(
                # A message without an id is still addressed by one: kept apart from task ids.
                task_id=str(task_id or headers.get("id") or f"refused-{uuid.uuid4()}"),
                task_name=str(task_name or headers.get("task") or "unknown"),
                queue=delivery.get("routing_key"),
                reason="refused",
                arguments=arguments,
                arguments_complete=complete,
                error_type=type(exc).__name__,
                error_module=type(exc).__module__,
                error_message=_error_text(exc),
                traceback=None,
                attempts=int(headers.get("retries") or 0) + 1,
                worker=socket.gethostname(),
                first_failed_at=now,
                last_failed_at=now,
            )
        )

    def _record(self, letter: DeadLetter) -> None:
        try:
            store = self.store()
            worker_loop.run(asyncio.wait_for(store.record(letter), RECORD_TIMEOUT))
        except Exception as exc:  # noqa: BLE001 - the task's outcome stands; say what was lost
            _log.error(
                "Could not record the dead letter of task %s (%s): %s: %s",
                letter.task_id,
                letter.task_name,
                type(exc).__name__,
                mask_url_passwords(str(exc)),
            )


class RecordingConsumer(Consumer):
    """Celery's consumer (``worker_consumer``), which also reports undecodable messages.

    Celery logs and acknowledges a message whose body it cannot decode
    without any signal; this sends ``task_rejected`` for it as for the other
    messages it refuses, so that it becomes a dead letter too. It also builds
    the framework tasks' tracers without Celery's success record
    (``update_strategies``).
    """

    def update_strategies(self) -> None:
        """Celery's handlers and tracers of every task, the framework's without a success record.

        Called at every start of the consumer (a broker reconnection too), so
        the framework's tracers are rebuilt each time Celery rebuilds them.
        """
        super().update_strategies()
        build_quiet_tracers(self.app, self.hostname)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's handler of each message; tracing on, run in the message's trace context.

        The lines logged while a message is received ("Task ... received", a
        refused message) then carry its trace id, and the span id of the publish
        that sent it: the run's span does not exist yet.
        """
        handler = super().create_task_handler(*args, **kwargs)
        if not tracing_active():
            return handler

        def on_task_received(message: Any) -> Any:
            with restored_trace(trace_headers(getattr(message, "headers", None))):
                return handler(message)

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        super().on_decode_error(message, exc)
        signals.task_rejected.send(sender=self, message=message, exc=exc)


def _request_of(task: Any, task_id: str) -> Any:
    """The failed run's request: the task's own in the process that ran it.

    A hard time limit is reported by the worker's main process, where the task
    has no current request, and Celery has already taken the run out of its
    active requests: what the backend stored with the failure (retries,
    worker, queue: ``result_extended``) stands in for it.
    """
    request = getattr(task, "request", None)
    if request is not None and getattr(request, "id", None) == task_id:
        return request
    from celery.worker import state  # the worker's module: only where a worker runs

    for active in list(state.active_requests):
        if getattr(active, "id", None) == task_id:
            fields = getattr(active, "request_dict", None) or {}
            return _RequestFields(
                retries=fields.get("retries"),
                hostname=getattr(active, "hostname", None),
                delivery_info=getattr(active, "delivery_info", None) or {},
                headers=fields,
            )
    if task is None:
        return None
    try:
        meta = task.backend.get_task_meta(task_id)
    except Exception:  # noqa: BLE001 - the dead letter is written with what is known
        return None
    return _RequestFields(
        retries=meta.get("retries"),
        hostname=meta.get("worker"),
        delivery_info={"routing_key": meta.get("queue")},
        headers={},
    )


@dataclass(frozen=True, slots=True)
class _RequestFields:
    """The fields of a task request that a dead letter reads."""

    retries: int | None
    hostname: str | None
    delivery_info: Mapping[str, Any]
    headers: Mapping[str, Any]


def _header(request: Any, name: str) -> Any:
    if request is None:
        return None
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def _message_arguments(message: Any) -> tuple[str, bool]:
    """A refused message's arguments: decoded when it is a task message, else its raw body."""
    try:
        decoded = message.decode()
        if isinstance(decoded, list | tuple) and len(decoded) >= 2:
            return encode_arguments(decoded[0], decoded[1])
    except Exception:  # noqa: BLE001 - unreadable: its raw body is kept instead
        pass
    body = getattr(message, "body", b"")
    raw = body.decode("utf-8", "backslashreplace") if isinstance(body, bytes) else str(body)
    arguments, _ = encode_arguments([], {"raw_body": raw})
    return arguments, False
