"""The tasks the benchmark workers run (``--include bench.tasks``).

Each comparison pairs a framework task with the hand-written Celery task it
replaces; both are registered on the same app and run by the same worker
settings (broker, pool, concurrency, result backend).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.core.background import TaskContext, celery_app, db_task, simple_task
from app.core.config import get_settings

INSERT_SQL = "INSERT INTO bench_rows (value) VALUES (:value)"
INSERT = text(INSERT_SQL)
CREATE_TABLE = "CREATE TABLE IF NOT EXISTS bench_rows (id bigserial PRIMARY KEY, value text)"


# -- no-op --------------------------------------------------------------------


@simple_task(name="bench.noop")
def noop(ctx: TaskContext, i: int) -> None:
    """The framework's no-op."""


@celery_app.task(name="bench.raw_noop")
def raw_noop(i: int) -> None:
    """Celery's own no-op."""


@celery_app.task(name="bench.raw_noop_limited", time_limit=330, soft_time_limit=300)
def raw_noop_limited(i: int) -> None:
    """Celery's own no-op with the time limits of the framework's ``standard`` policy."""


@simple_task(name="bench.noop_unlimited", time_limit=None, soft_time_limit=None)
def noop_unlimited(ctx: TaskContext, i: int) -> None:
    """The framework's no-op without time limits, to see what the limits cost."""


# -- limits (bench/admission.py) ----------------------------------------------


# Far above any load this machine can make: the check runs, never refuses.
@simple_task(name="bench.noop_rate_limited", rate_limit="1000000/s")
def noop_rate_limited(ctx: TaskContext, i: int) -> None:
    """The no-op under a rate limit it never reaches."""


@simple_task(name="bench.noop_capped", concurrency=100_000, concurrency_key=lambda i, **_: i % 16)
def noop_capped(ctx: TaskContext, i: int) -> None:
    """The no-op under a keyed concurrency cap it never reaches (a slot taken and given back)."""


_fairness_redis: Any = None


@simple_task(name="bench.tenant_job", concurrency=3, concurrency_key=lambda tenant, **_: tenant)
async def tenant_job(ctx: TaskContext, tenant: str, seconds: float) -> None:
    """Three of a tenant at once; each end is written to ``fair:{tenant}`` (broker database)."""
    global _fairness_redis
    if _fairness_redis is None:
        import redis

        _fairness_redis = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    await asyncio.sleep(seconds)
    _fairness_redis.rpush(f"fair:{tenant}", time.time())


# -- one INSERT ---------------------------------------------------------------


@db_task(name="bench.db_insert")
async def db_insert(ctx: TaskContext, value: str) -> None:
    """The framework: one INSERT through ctx.session (commit by the framework)."""
    await ctx.session.execute(INSERT, {"value": value})


@celery_app.task(name="bench.naive_insert")
def naive_insert(value: str) -> None:
    """(a) What most tutorials show: asyncio.run() and an engine per task."""

    async def run() -> None:
        engine = create_async_engine(get_settings().database_url)
        try:
            async with AsyncSession(engine) as session:
                await session.execute(INSERT, {"value": value})
                await session.commit()
        finally:
            await engine.dispose()

    asyncio.run(run())


class _PerProcess:
    """(b) hand-tuned: one loop, one pooled engine per process, created after the fork."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sessions: async_sessionmaker[AsyncSession] | None = None
        self.pool: Any = None

    def ensure(self) -> asyncio.AbstractEventLoop:
        if self.pid != os.getpid():
            self.loop = asyncio.new_event_loop()
            engine = create_async_engine(get_settings().database_url, pool_size=5)
            self.sessions = async_sessionmaker(engine, expire_on_commit=False)
            self.pool = None
            self.pid = os.getpid()
        assert self.loop is not None
        return self.loop


_tuned = _PerProcess()


@celery_app.task(name="bench.tuned_insert")
def tuned_insert(value: str) -> None:
    """(b) A raw Celery task with a persistent loop and a pooled AsyncSession."""
    loop = _tuned.ensure()
    assert _tuned.sessions is not None
    sessions = _tuned.sessions

    async def run() -> None:
        async with sessions() as session:
            await session.execute(INSERT, {"value": value})
            await session.commit()

    loop.run_until_complete(run())


@celery_app.task(name="bench.asyncpg_insert")
def asyncpg_insert(value: str) -> None:
    """For scale: raw asyncpg, one connection on a persistent loop, no SQLAlchemy."""
    loop = _tuned.ensure()
    if _tuned.pool is None:
        dsn = get_settings().database_url.replace("postgresql+asyncpg://", "postgresql://")
        _tuned.pool = loop.run_until_complete(asyncpg.connect(dsn))
    connection = _tuned.pool

    async def run() -> None:
        await connection.execute("INSERT INTO bench_rows (value) VALUES ($1)", value)

    loop.run_until_complete(run())


# -- I/O-bound async bodies (suites io, io_db) ----------------------------------

PG_SLEEP = text("SELECT pg_sleep(:seconds)")


@simple_task(name="bench.sleep")
async def sleep(ctx: TaskContext, seconds: float) -> None:
    """A task that awaits I/O and does nothing else."""
    await asyncio.sleep(seconds)


@db_task(name="bench.pg_sleep")
async def pg_sleep(ctx: TaskContext, seconds: float) -> None:
    """A task that waits in PostgreSQL, through ctx.session (commit by the framework)."""
    await ctx.session.execute(PG_SLEEP, {"seconds": seconds})
