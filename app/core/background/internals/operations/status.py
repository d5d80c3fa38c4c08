"""What happened to a task: one status object from the result backend.

Celery reports an id it has never seen as ``PENDING``, exactly as it reports a
queued task. To tell the two apart the framework records every first publish
of a task as the state ``SENT`` (``before_task_publish``, so the worker's own
states always come later). Then ``PENDING`` means *unknown*: never dispatched
through this app, or its result expired (``result_expires``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from celery import Celery, states
from celery.backends.base import BaseKeyValueStoreBackend
from celery.backends.redis import RedisBackend
from celery.exceptions import TaskRevokedError

from ..registry import DEFERRALS_HEADER
from ..transport.result_backend import AtomicRedisBackend

_logger = logging.getLogger("app.core.background.dispatch")

SENT = "SENT"
PROGRESS = "PROGRESS"
# A run that had to wait for its task's rate limit or concurrency cap: sent
# again for later (``admission/gate.py``), with the limit, key and time in its result.
WAITING = "WAITING"

TaskState = Literal[
    "unknown",
    "pending",
    "waiting",
    "started",
    "progress",
    "retry",
    "success",
    "failure",
    "revoked",
]

_STATES: dict[str, TaskState] = {
    states.PENDING: "unknown",
    SENT: "pending",
    states.RECEIVED: "pending",
    WAITING: "waiting",
    states.STARTED: "started",
    PROGRESS: "progress",
    states.RETRY: "retry",
    states.SUCCESS: "success",
    states.FAILURE: "failure",
    states.REVOKED: "revoked",
}


@dataclass(slots=True)
class TaskStatus:
    """A task's state as the API reports it."""

    task_id: str
    state: TaskState
    result: Any = None
    error_type: str | None = None
    error_module: str | None = None
    error_message: str | None = None
    # ``ctx.attempt`` of the latest run: 0 for the first, 1 for the first retry...
    attempt: int | None = None
    progress: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return self.state != "unknown"

    @property
    def finished(self) -> bool:
        return self.state in ("success", "failure", "revoked")


def record_sent(app: Celery, task_id: str) -> None:
    """Store ``SENT`` for a task about to be published (one write, no read)."""
    meta: dict[str, Any] = {
        "status": SENT,
        "result": None,
        "traceback": None,
        "children": [],
        "date_done": None,
        "task_id": task_id,
    }
    _store(app, task_id, meta, SENT)


# Deletes the key only while it still holds SENT: a message whose publish
# reply was lost may have reached a worker, whose own state must stay.
_FORGET_IF_SENT = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SENT' then
    return redis.call('DEL', KEYS[1])
  end
end
return 0
"""


def forget_unsent(app: Celery, task_ids: list[str]) -> None:
    """Remove the ``SENT`` records of tasks whose publish failed (best effort)."""
    backend = app.backend
    for task_id in task_ids:
        try:
            if isinstance(backend, RedisBackend):
                backend.client.eval(_FORGET_IF_SENT, 1, backend.get_key_for_task(task_id))
            elif isinstance(backend, BaseKeyValueStoreBackend):
                meta = raw_meta(app, task_id)
                if meta is not None and meta.get("status") == SENT:
                    backend.delete(backend.get_key_for_task(task_id))
            elif (meta := backend.get_task_meta(task_id)).get("status") == SENT:
                # The database backend: forget() deletes the row.
                backend.forget(task_id)
        except Exception as exc:  # noqa: BLE001 - the dispatch error is what the caller gets
            # The backend is down too: then the SENT write most likely failed as well.
            _logger.warning(
                "Could not remove the SENT record of an unsent task",
                extra={"fields": {"task_id": task_id, "error": repr(exc)}},
            )


def record_revoked(app: Celery, task_id: str, reason: str) -> None:
    """Store ``REVOKED`` now, without waiting for a worker to see the revocation."""
    error = app.backend.prepare_exception(TaskRevokedError(reason))
    meta: dict[str, Any] = {
        "status": states.REVOKED,
        "result": error,
        "traceback": None,
        "children": [],
        "date_done": datetime.now(UTC).isoformat(),
        "task_id": task_id,
    }
    _store(app, task_id, meta, states.REVOKED)


# Set by ``buffered_sent_records``: the SENT writes of a bulk dispatch go into
# one Redis pipeline, executed before any of its messages is published.
_sent_pipeline: ContextVar[Any | None] = ContextVar("background_sent_pipeline", default=None)


@contextmanager
def buffered_sent_records(app: Celery) -> Iterator[None]:
    """Buffer the SENT records made inside the block; write them all when it ends.

    The caller must publish the block's messages only after it ends (a worker
    must never find SENT written after its own STARTED or SUCCESS).
    """
    backend = app.backend
    if not isinstance(backend, RedisBackend):
        yield
        return
    pipeline = backend.client.pipeline(transaction=False)
    token = _sent_pipeline.set(pipeline)
    try:
        yield
    finally:
        _sent_pipeline.reset(token)
    pipeline.execute()


def _store(app: Celery, task_id: str, meta: dict[str, Any], state: str) -> None:
    backend = app.backend
    if state != SENT and isinstance(backend, AtomicRedisBackend):
        # A revocation arriving after the task succeeded keeps the result.
        backend.store_unless_succeeded(task_id, meta)
    elif isinstance(backend, RedisBackend):
        # One SET with the backend's expiry: no read-before-write, no pub/sub.
        key = backend.get_key_for_task(task_id)
        expires = getattr(backend, "expires", None) or None
        client = _sent_pipeline.get() if state == SENT else None
        (client or backend.client).set(key, backend.encode(meta), ex=expires)
    elif isinstance(backend, BaseKeyValueStoreBackend):
        backend.set(backend.get_key_for_task(task_id), backend.encode(meta))
    else:
        backend.store_result(task_id, meta["result"], state)


def on_before_publish(
    app: Celery, headers: Mapping[str, Any] | None, routing_key: str | None = None
) -> None:
    """Record the first publish of a task (not its retries or deferrals, not Celery's own)."""
    headers = headers or {}
    task_id, name = headers.get("id"), str(headers.get("task") or "")
    if (
        not task_id
        or headers.get("retries")
        or headers.get(DEFERRALS_HEADER)
        or name.startswith("celery.")
    ):
        return
    task = app.tasks.get(name) if name in app.tasks else None
    if task is not None and task.ignore_result:
        return
    record_sent(app, str(task_id))


def raw_meta(app: Celery, task_id: str) -> dict[str, Any] | None:
    """The stored meta as written, before Celery rebuilds an exception from it."""
    backend = app.backend
    if not isinstance(backend, BaseKeyValueStoreBackend):
        return None
    data = backend.get(backend.get_key_for_task(task_id))
    if not data:
        return None
    meta = backend.decode(data)
    return dict(meta) if isinstance(meta, Mapping) else None


def get_task_status(app: Celery, task_id: str) -> TaskStatus:
    """Read a task's status from the result backend (blocking: call it from a thread)."""
    raw = raw_meta(app, task_id)
    if raw is None:
        raw = dict(app.backend.get_task_meta(task_id))
    celery_state = str(raw.get("status") or states.PENDING)
    status = TaskStatus(task_id=task_id, state=_STATES.get(celery_state, "pending"))
    if raw.get("retries") is not None:
        status.attempt = int(raw["retries"])
    value = raw.get("result")
    if status.state == "success":
        status.result = value
    elif status.state in ("failure", "retry", "revoked"):
        _describe_error(status, value)
    elif status.state == "progress" and isinstance(value, Mapping):
        status.progress = dict(value)
    elif status.state == "waiting" and isinstance(value, Mapping):
        status.extra = {k: value[k] for k in ("limit", "key", "until", "deferrals") if k in value}
    elif status.state == "started" and isinstance(value, Mapping):
        status.extra = {k: value[k] for k in ("hostname", "pid") if k in value}
    return status


def _describe_error(status: TaskStatus, value: Any) -> None:
    if isinstance(value, Mapping) and "exc_type" in value:
        # The raw form: readable even when Celery cannot rebuild the exception
        # (sqlalchemy's IntegrityError needs arguments it does not store).
        status.error_type = str(value["exc_type"])
        status.error_module = str(value.get("exc_module") or "") or None
        message = value.get("exc_message")
        if isinstance(message, list | tuple):
            message = " ".join(str(part) for part in message)
        status.error_message = None if message is None else str(message)
    elif isinstance(value, BaseException):
        status.error_type = type(value).__name__
        status.error_module = type(value).__module__
        status.error_message = str(value)
