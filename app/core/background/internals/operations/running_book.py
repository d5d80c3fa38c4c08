"""Running tasks and worker heartbeats kept in a database result backend (the embedded default).

The Redis result backend keeps the running set in the script that writes each
state (``running.py``). Celery's database backend (``db+sqlite://`` by
default, ``db+postgresql://``) has no such hook, so the worker keeps two small
tables next to Celery's ``celery_taskmeta``:

* ``background_running``: one row per run in progress, added at Celery's
  ``task_prerun`` and removed at ``task_postrun`` (in the process that runs it);
* ``background_worker_heartbeats``: each worker main process's last beat.

A run whose process died leaves its row behind: its worker falls silent and
the page shows the run as stuck; once the task has a final state in the
backend, the next reading removes the row. Every write is best effort (logged
at DEBUG): the bookkeeping never changes a task's outcome.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import states
from celery.backends.database import DatabaseBackend
from sqlalchemy import (
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    insert,
    select,
    update,
)

from ..logging import FRAMEWORK_LOGGER_NAME

_log = logging.getLogger(FRAMEWORK_LOGGER_NAME)

metadata = MetaData()
running_runs = Table(
    "background_running",
    metadata,
    Column("task_id", String(255), primary_key=True),
    Column("task_name", String(255)),
    Column("worker", String(255)),
    Column("pid", Integer),
    Column("attempt", Integer),
    Column("queue", String(255)),
    Column("started_at", Float, nullable=False),
)
worker_heartbeats = Table(
    "background_worker_heartbeats",
    metadata,
    Column("worker", String(255), primary_key=True),
    Column("beat_at", Float, nullable=False),
)


@dataclass(frozen=True, slots=True)
class BookedRun:
    """One run in progress, as the framework keeps it (this table, or Redis's running set)."""

    task_id: str
    task_name: str | None
    worker: str | None
    pid: int | None
    attempt: int | None
    queue: str | None
    started_at: float
    state: str = states.STARTED  # or PROGRESS (Redis only: this table keeps no progress)


class RunningBook:
    """The two tables in the result backend's database, for one process."""

    def __init__(self, backend: DatabaseBackend) -> None:
        # Any: celery-types does not declare the backend's url and engine_options.
        self._backend: Any = backend
        self._engine: Engine | None = None
        self._engine_pid = 0
        self._lock = threading.Lock()

    def engine(self) -> Engine:
        # One engine per process: a prefork child must not use its parent's connections.
        with self._lock:
            if self._engine is None or self._engine_pid != os.getpid():
                engine = create_engine(self._backend.url, **self._backend.engine_options)
                metadata.create_all(engine, checkfirst=True)
                self._engine, self._engine_pid = engine, os.getpid()
            return self._engine

    # -- writes (worker) ----------------------------------------------------------

    def started(self, run: BookedRun) -> None:
        with self.engine().begin() as connection:
            connection.execute(delete(running_runs).where(running_runs.c.task_id == run.task_id))
            connection.execute(insert(running_runs).values(**_fields(run)))

    def ended(self, task_id: str) -> None:
        with self.engine().begin() as connection:
            connection.execute(delete(running_runs).where(running_runs.c.task_id == task_id))

    def beat(self, worker: str, now: float) -> None:
        with self.engine().begin() as connection:
            found = connection.execute(
                update(worker_heartbeats)
                .where(worker_heartbeats.c.worker == worker)
                .values(beat_at=now)
            )
            if found.rowcount == 0:
                connection.execute(insert(worker_heartbeats).values(worker=worker, beat_at=now))

    def forget_worker(self, worker: str) -> None:
        with self.engine().begin() as connection:
            connection.execute(
                delete(worker_heartbeats).where(worker_heartbeats.c.worker == worker)
            )

    # -- reads (the page) --------------------------------------------------------------

    def read(self, limit: int) -> tuple[list[BookedRun], dict[str, float]]:
        """The runs in progress (oldest first) and every worker's last beat.

        Rows of runs whose task already has a final state (a process that died
        before ``task_postrun``, then the run delivered again and finished) are
        removed on the way.
        """
        with self.engine().begin() as connection:
            rows = connection.execute(
                select(running_runs).order_by(running_runs.c.started_at).limit(limit)
            ).all()
            beats = {
                str(worker): float(beat_at)
                for worker, beat_at in connection.execute(select(worker_heartbeats)).all()
            }
        runs = [BookedRun(**row._asdict()) for row in rows]
        finished = self._finished([run.task_id for run in runs])
        if finished:
            with self.engine().begin() as connection:
                connection.execute(delete(running_runs).where(running_runs.c.task_id.in_(finished)))
        return [run for run in runs if run.task_id not in finished], beats

    def _finished(self, task_ids: Sequence[str]) -> set[str]:
        if not task_ids:
            return set()
        taskmeta = self._backend.task_cls.__table__
        with self.engine().connect() as connection:
            rows = connection.execute(
                select(taskmeta.c.task_id).where(
                    taskmeta.c.task_id.in_(task_ids),
                    taskmeta.c.status.in_(sorted(states.READY_STATES)),
                )
            ).all()
        return {str(task_id) for (task_id,) in rows}


def _fields(run: BookedRun) -> dict[str, Any]:
    return {column.name: getattr(run, column.name) for column in running_runs.columns}


def book_of(app: Any) -> RunningBook | None:
    """This process's book for ``app``'s result backend, or None when it is not a database."""
    backend = app.backend
    if not isinstance(backend, DatabaseBackend):
        return None
    book = getattr(backend, "_background_running_book", None)
    if book is None:
        book = RunningBook(backend)
        backend._background_running_book = book  # type: ignore[attr-defined]
    return book


def on_task_prerun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    """Celery's ``task_prerun``: write the run down (database result backends only)."""
    book = book_of(sender.app) if sender is not None else None
    if book is None or task_id is None:
        return
    request = sender.request
    delivery = getattr(request, "delivery_info", None) or {}
    run = BookedRun(
        task_id=task_id,
        task_name=sender.name,
        worker=getattr(request, "hostname", None),
        pid=os.getpid(),
        attempt=int(getattr(request, "retries", 0) or 0),
        queue=delivery.get("routing_key"),
        started_at=time.time(),
    )
    try:
        book.started(run)
    except Exception as exc:  # noqa: BLE001 - bookkeeping only: the run goes on
        _log.debug("Could not write down running task %s: %r", task_id, exc)


def on_task_postrun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    """Celery's ``task_postrun``: the run has ended, whatever its outcome."""
    book = book_of(sender.app) if sender is not None else None
    if book is None or task_id is None:
        return
    try:
        book.ended(task_id)
    except Exception as exc:  # noqa: BLE001 - a row left behind is removed at the next reading
        _log.debug("Could not strike out running task %s: %r", task_id, exc)
