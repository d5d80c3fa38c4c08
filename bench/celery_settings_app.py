"""A bare Celery app: no framework code at all (not its app, signals, logging or backend).

Used by ``bench/bench_celery_settings.py`` and, as "raw Celery", by the
``python -m bench`` suites ``raw`` and ``io``/``io_db`` (``bench/io.py``).

``BENCH_SETTINGS=defaults`` is Celery out of the box (acknowledged on receipt,
prefetch 4, no result backend); ``framework`` (the default) is the framework's
delivery and result settings, item by item as ``build_celery_config`` in
``app/core/background/celery_app.py`` sets them: JSON only, late
acknowledgement, reject and retry on a lost worker, prefetch 1, STARTED
tracked, extended results on the same Redis, the same queues and the same
visibility timeout. What it leaves out is the framework's own: its Redis
transport subclass, bounded publish (``BoundedAMQP``), task classes, signals
(SENT record, logging set-up, metrics, deduplication) and its result backend.

Environment: ``BENCH_BROKER``, ``BENCH_BACKEND``, and for the tasks that use
PostgreSQL ``BENCH_DATABASE_URL`` with ``BENCH_POOL_SIZE`` (max overflow 10,
SQLAlchemy's default, as the framework's engine has).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from celery import Celery
from kombu import Queue

T = TypeVar("T")

QUEUE_NAMES = ("high_priority", "default", "low_priority")

app = Celery("bench_raw", broker=os.environ["BENCH_BROKER"], set_as_current=False)
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
if os.environ.get("BENCH_SETTINGS", "framework") == "framework":
    app.conf.update(
        result_backend=os.environ["BENCH_BACKEND"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_retry_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        task_track_started=True,
        result_extended=True,
        result_expires=int(os.environ.get("BENCH_RESULT_EXPIRES", "86400")),
        task_queues=[Queue(name, routing_key=name) for name in QUEUE_NAMES],
        task_default_queue="default",
        task_default_exchange_type="direct",
        task_create_missing_queues=False,
        broker_transport_options={
            "visibility_timeout": int(os.environ.get("BENCH_VISIBILITY_TIMEOUT", "3600"))
        },
    )


@app.task(name="bench_raw.noop")
def noop(i: int) -> None:
    """Nothing: the cost measured is Celery's own."""


@app.task(name="bench_raw.noop_limited", time_limit=330, soft_time_limit=300)
def noop_limited(i: int) -> None:
    """The no-op with the time limits of the framework's ``standard`` retry policy."""


@app.task(name="bench_raw.noop_unstarted", track_started=False)
def noop_unstarted(i: int) -> None:
    """The no-op without the STARTED state: what tracking it costs in Celery itself."""


# -- I/O-bound async bodies ----------------------------------------------------
#
# What a careful hand-written Celery task does for an async body: one event loop
# per process, in a daemon thread (so that every thread of a ``threads`` pool
# can use it), and one pooled engine on it, both created after the fork.


class _ProcessLoop:
    def __init__(self) -> None:
        self.pid: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sessions: Any = None
        self.lock = threading.Lock()

    def get(self) -> asyncio.AbstractEventLoop:
        with self.lock:
            if self.pid != os.getpid() or self.loop is None:
                self.loop = asyncio.new_event_loop()
                threading.Thread(target=self.loop.run_forever, daemon=True).start()
                self.sessions = None
                self.pid = os.getpid()
            return self.loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.get()).result()

    def session_factory(self) -> Any:
        if self.sessions is None:
            from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

            engine = create_async_engine(
                os.environ["BENCH_DATABASE_URL"],
                pool_size=int(os.environ.get("BENCH_POOL_SIZE", "5")),
                max_overflow=10,
            )
            self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        return self.sessions


_process = _ProcessLoop()


@app.task(name="bench_raw.sleep")
def sleep(seconds: float) -> None:
    """``await asyncio.sleep(seconds)`` on the process's loop."""
    _process.run(asyncio.sleep(seconds))


@app.task(name="bench_raw.pg_sleep")
def pg_sleep(seconds: float) -> None:
    """``SELECT pg_sleep(seconds)`` through a pooled AsyncSession on the process's loop."""
    from sqlalchemy import text

    _process.get()

    async def run() -> None:
        async with _process.session_factory()() as session:
            await session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
            await session.commit()

    _process.run(run())
