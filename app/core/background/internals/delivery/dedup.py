"""Deduplication by custom ``task_id``: one queued-or-running task per id.

Celery alone sends a second message for a second ``apply_async`` with the same
id. Here a producer that passes ``task_id`` first takes a lease on that id
(``LeaseStore``) with a fresh holder token; the token travels with the message
(a header), and the worker releases the lease with a compare-and-delete on
that token when the task ends, in every ending path. A lease that nobody
releases (a crash, a lost message) expires; its lifetime covers the task's
time limit, every retry delay of its policy, and a queue-wait margin.

Calls without ``task_id`` never reach this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject, TimeLimitExceeded, WorkerLostError
from celery.result import AsyncResult
from celery.worker.state import REVOKE_EXPIRES

from ..exceptions import TaskDeferred, TaskError
from ..logging import FRAMEWORK_LOGGER_NAME
from ..monitoring import task_metrics
from ..registry import (
    DEFERRALS_HEADER,
    KEEP_UNTIL_HEADER,
    PERIOD_HEADER,
    TOKEN_HEADER,
    TTL_HEADER,
)
from ..retry import delay_scale
from .lease_stores import REVOKED, DatabaseLeaseStore, LeaseStore, RedisLeaseStore
from .publish import Message, bounded_dispatch, publish

_log = logging.getLogger(FRAMEWORK_LOGGER_NAME)


def is_deduplicated(task_id: str | None, options: Mapping[str, Any]) -> bool:
    """Whether a send goes through deduplication: a custom id, or a periodic firing."""
    return task_id is not None or PERIOD_HEADER in (options.get("headers") or {})


def log_deduplicated(
    task_name: str,
    task_id: str | None = None,
    queue: str | None = None,
    # Callers name ``where``: '*' or '/' here are the same. pragma: no mutate
    *,  # pragma: no mutate
    where: str = "dispatch",
    **fields: Any,
) -> None:
    """The framework's line (and metric) for a task skipped as a duplicate.

    ``where``: ``dispatch`` (not sent) or ``worker`` (received, not run).
    """
    task_metrics().deduplicated.labels(task_name, queue or "").inc()
    _log.info(
        "Task deduplicated",
        extra={
            "fields": {
                "task_id": task_id,
                "task_name": task_name,
                "queue": queue,
                "outcome": "deduplicated",
                "where": where,
                **fields,
            }
        },
    )


class TaskIdRevokedError(TaskError):
    """The ``task_id`` belongs to a revoked or expired task: Celery would drop it silently."""


# -- key helpers ---------------------------------------------------------


def notify_key(user_id: object) -> str:
    """``notify-{user_id}``: one notification task per user at a time."""
    return f"notify-{user_id}"


def update_key(entity_id: object) -> str:
    """``update-{entity_id}``: one update task per entity at a time."""
    return f"update-{entity_id}"


def daily_key(day: date | str | None = None) -> str:
    """``daily-{date}``: once per day (today, in UTC, by default)."""
    if day is None:
        day = datetime.now(UTC).date()
    return f"daily-{day.isoformat() if isinstance(day, date) else day}"


def args_key(task: Any, *args: Any, **kwargs: Any) -> str:
    """An id derived from the task's name and arguments: one task per argument set.

    A stable hash of the arguments as canonical JSON (sorted keys), so equal
    arguments give the same id in every process and every Python version.
    """
    name = task if isinstance(task, str) else task.name
    payload = json.dumps([list(args), kwargs], sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(payload.encode()).hexdigest()[:32]
    return f"{name}:{digest}"


# -- lease lifetime ------------------------------------------------------


def lease_lifetime(task: Any, scale: float, queue_margin: float) -> float:
    """Seconds a lease on one of ``task``'s ids may live without a release.

    Every attempt may run to the hard time limit, every retry may wait the
    policy's longest delay for that retry (jitter included, scaled), plus the
    time the message may wait in the queue. A worker extends the lease when the task starts
    and on each retry, so the margin is counted from the latest of those.
    """
    policy = task.policy
    time_limit = float(task.time_limit or policy.time_limit)
    retries = policy.max_retries
    delays = sum(policy.longest_delay_for(n) for n in range(retries))
    return float(time_limit * (retries + 1) + delays * scale + queue_margin)


# -- the producer side ---------------------------------------------------


class Deduplicator:
    """Takes, extends and releases leases; configured once per process."""

    def __init__(self) -> None:
        self._store_factory: Callable[[], LeaseStore] | None = None
        self._store: LeaseStore | None = None
        # Replaced by configure() (BACKGROUND_DEDUP_QUEUE_MARGIN) in every app: pragma: no mutate
        self.queue_margin = 3600.0  # pragma: no mutate
        # How long a worker remembers a revoked id (CELERY_WORKER_REVOKE_EXPIRES).
        self.revoke_expires = float(REVOKE_EXPIRES)

    def configure(self, store_factory: Callable[[], LeaseStore], queue_margin: float) -> None:
        """Say where leases live; nothing connects until a task id is used."""
        self._store_factory = store_factory
        self._store = None
        self.queue_margin = queue_margin

    def use_store(self, store: LeaseStore) -> None:
        """Use this store from now on (tests, or a store built by the application)."""
        self._store = store

    @property
    def store(self) -> LeaseStore:
        if self._store is None:
            if self._store_factory is None:
                raise RuntimeError("task deduplication is not configured")
            self._store = self._store_factory()
        return self._store

    def send(self, app: Celery, message: Message) -> AsyncResult[Any]:
        """Publish ``message`` unless a lease on its id is held; else the holder's result.

        A retry or a deferral (the worker sends the same task again, with the
        same id and headers) keeps, and extends, the lease it has; a retry of a task sent without a
        custom id has none and takes none.
        """
        task = message.task
        assert not isinstance(task, str), "deduplication needs the task object"
        headers = dict(message.options.get("headers") or {})
        # A deferral (the task waited for its limits) is sent again as a retry is.
        if message.options.get("retries") or headers.get(DEFERRALS_HEADER):
            if token := headers.get(TOKEN_HEADER):
                # A failing lease store must not drop the retry: the lease then expires.
                self._guarded(self.store.extend, message.task_id, token, float(headers[TTL_HEADER]))
            return publish(app, message)
        lease: dict[str, Any] = {}
        ttl = lease_lifetime(task, delay_scale(app), self.queue_margin)
        if (period := headers.pop(PERIOD_HEADER, None)) is not None:
            key, keep_until = period_key(period, app.now())
            message = replace(
                message,
                task_id=f"{task.name}:{key}",
                options={**message.options, "headers": headers},
            )
            ttl = max(ttl, keep_until - time.time())
            lease[KEEP_UNTIL_HEADER] = keep_until
        token = uuid.uuid4().hex
        lease.update({TOKEN_HEADER: token, TTL_HEADER: ttl})
        # The lease store is part of the dispatch: its time counts, its failure is one.
        with bounded_dispatch(app, task.name, message.queue, [message.task_id]):
            holder = self.store.acquire(message.task_id, token, ttl)
            if holder != token:
                return self._refused(app, message, holder)
            try:
                return publish(app, replace(message, headers={**message.headers, **lease}))
            except BaseException:
                self._guarded(self.store.release, message.task_id, token)
                raise

    def _refused(self, app: Celery, message: Message, holder: str | None) -> AsyncResult[Any]:
        if holder == REVOKED:
            raise TaskIdRevokedError(
                f"{message.task_name}: task_id {message.task_id!r} belongs to a revoked or "
                "expired task; Celery workers drop a new task with that id for "
                f"{self.revoke_expires:.0f}s: use another id"
            )
        log_deduplicated(message.task_name, message.task_id, message.queue)
        return AsyncResult(message.task_id, app=app)

    # -- the worker side ---------------------------------------------------

    def started(self, task_id: str, headers: Mapping[str, Any]) -> None:
        """The task starts: its lease lives a full lifetime from now."""
        token = headers.get(TOKEN_HEADER)
        if token:
            self._guarded(self.store.extend, task_id, token, float(headers[TTL_HEADER]))

    def finished(self, task_id: str, headers: Mapping[str, Any]) -> None:
        """The task ended for good: free its id (a period's id stays until the period ends)."""
        token = headers.get(TOKEN_HEADER)
        if not token:
            return
        # No period: any small default leaves keep far below 0.
        keep_until = float(headers.get(KEEP_UNTIL_HEADER) or 0)  # pragma: no mutate
        keep = keep_until - time.time()
        # A float clock reading equal to the period's end: '>' or '>=' alike. pragma: no mutate
        if keep > 0:  # pragma: no mutate
            self._guarded(self.store.extend, task_id, token, keep)
        else:
            self._guarded(self.store.release, task_id, token)

    def revoked(self, task_id: str, headers: Mapping[str, Any]) -> None:
        """A revoked or expired task: keep its id refused while workers remember it."""
        token = headers.get(TOKEN_HEADER)
        if token:
            self._guarded(self.store.mark_revoked, task_id, token, self.revoke_expires)

    @staticmethod
    def _guarded(method: Callable[..., Any], *args: Any) -> None:
        try:
            method(*args)
        except Exception:  # noqa: BLE001 - the lease then expires by itself
            _log.exception(
                "Task lease update failed; the lease will expire",
                extra={"fields": {"task_id": args[0] if args else None}},
            )


deduplicator = Deduplicator()


# -- periods of periodic tasks ---------------------------------------------

NAMED_PERIODS = ("minutely", "hourly", "daily", "weekly", "monthly")


def period_key(period: str, now: datetime) -> tuple[str, float]:
    """The key of the period that contains ``now`` and the time (epoch) it ends.

    ``period`` is a named period (``daily``...) or ``every:<seconds>`` for
    interval schedules (periods aligned on the epoch).
    """
    if period.startswith("every:"):
        seconds = float(period.split(":", 1)[1])
        index = int(now.timestamp() // seconds)
        return f"every{seconds:g}s-{index}", (index + 1) * seconds
    start = now.replace(microsecond=0)
    if period == "minutely":
        start = start.replace(second=0)
        key, end = f"minutely-{start:%Y-%m-%dT%H:%M}", start.timestamp() + 60
    elif period == "hourly":
        start = start.replace(minute=0, second=0)
        key, end = f"hourly-{start:%Y-%m-%dT%H}", start.timestamp() + 3600
    elif period == "daily":
        start = start.replace(hour=0, minute=0, second=0)
        key, end = daily_key(start.date()), _next_day(start, 1)
    elif period == "weekly":
        start = start.replace(hour=0, minute=0, second=0)
        year, week, weekday = start.isocalendar()
        key, end = f"weekly-{year}-W{week:02d}", _next_day(start, 8 - weekday)
    elif period == "monthly":
        start = start.replace(day=1, hour=0, minute=0, second=0)
        following = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
        key, end = f"monthly-{start:%Y-%m}", following.timestamp()
    else:
        raise ValueError(f"unknown period {period!r}; valid: {', '.join(NAMED_PERIODS)}")
    return key, end


def _next_day(start: datetime, days: int) -> float:
    return (start + timedelta(days=days)).timestamp()


# -- worker signals ------------------------------------------------------


def _lease_headers(request: Any) -> dict[str, Any]:
    """The dedup headers of a task request (Celery puts custom headers on the request)."""
    # Celery 5.7 fills both (see below): an empty dict or None here, the same. pragma: no mutate
    headers = getattr(request, "headers", None) or {}  # pragma: no mutate
    # Celery 5.7 gives a message's custom headers both ways (request.headers and
    # request attributes): either branch finds the same token. pragma: no mutate
    if TOKEN_HEADER in headers:  # pragma: no mutate
        return dict(headers)
    return {
        name: getattr(request, name, None) for name in (TOKEN_HEADER, TTL_HEADER, KEEP_UNTIL_HEADER)
    }


def run_once_key(request: Any) -> tuple[str, float] | None:
    """(token, lease lifetime) if this run's message was sent with a lease, else None."""
    headers = _lease_headers(request)
    token = headers.get(TOKEN_HEADER)
    if not token:
        return None
    # The lifetime header is always sent with the token: the default is never used.
    return str(token), float(headers.get(TTL_HEADER) or 0)  # pragma: no mutate


def _on_prerun(task_id: str = "", task: Any = None, **_: Any) -> None:
    if task is not None:
        deduplicator.started(task_id, _lease_headers(task.request))


def _on_postrun(
    task_id: str = "", task: Any = None, state: str | None = None, retval: Any = None, **_: Any
) -> None:
    if task is None or state == "RETRY" or isinstance(retval, TaskDeferred):
        return  # the retry's (the deferral's) apply_async extended the lease
    # Celery's Reject always has ``requeue``: the default is never used.
    requeue = getattr(retval, "requeue", False)  # pragma: no mutate
    if isinstance(retval, Reject) and requeue:
        return  # the same message, with the same token, comes back
    deduplicator.finished(task_id, _lease_headers(task.request))


def _on_failure(sender: Any = None, task_id: str = "", exception: Any = None, **_: Any) -> None:
    # In the worker's main process, for a task whose pool process died and
    # that is not retried nor requeued: postrun never ran for it.
    # A hard time limit kills the pool process too (TimeLimitExceeded). Celery
    # always sends the task as the sender (a None check could never be false).
    if isinstance(exception, WorkerLostError | TimeLimitExceeded):
        deduplicator.finished(task_id, _lease_headers(sender.request))


def _on_revoked(request: Any = None, **_: Any) -> None:
    if request is not None:
        deduplicator.revoked(str(request.id), _lease_headers(request))


def connect_worker_signals() -> None:
    """Release, extend and mark leases from the worker's task signals."""
    # Module-level functions live as long as the module: weak=True would change nothing.
    signals.task_prerun.connect(_on_prerun, weak=False)  # pragma: no mutate
    signals.task_postrun.connect(_on_postrun, weak=False)  # pragma: no mutate
    signals.task_failure.connect(_on_failure, weak=False)  # pragma: no mutate
    signals.task_revoked.connect(_on_revoked, weak=False)  # pragma: no mutate


def store_from_settings(settings: Any) -> Callable[[], LeaseStore]:
    """The lease store that the settings select (built on first use)."""
    url = settings.dedup_store_url
    if settings.dedup_backend == "redis":
        return lambda: RedisLeaseStore(url)
    return lambda: DatabaseLeaseStore(url)
