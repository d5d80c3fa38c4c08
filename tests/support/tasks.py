"""Tasks that the tests' worker runs (loaded with ``--include tests.support.tasks``).

Executions are counted in Redis (INCR) or recorded as rows in PostgreSQL, so a
test sees exactly how many times the worker ran a body.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from functools import cache
from typing import Any

import asyncpg
import redis
from sqlalchemy import text

from app.core.background import TaskContext, db_task, simple_task
from tests.support.models import Record


@cache
def counter() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])


def count(key: str) -> int:
    return int(counter().incr(f"executions:{key}"))


@db_task(name="tests.record", retry_policy="standard")
async def record(ctx: TaskContext, key: str) -> dict[str, Any]:
    ctx.session.add(Record(key=key, attempt=ctx.attempt, worker_pid=os.getpid()))
    return ctx.success_result(key=key)


@db_task(name="tests.record_then_fail", retry_policy="standard")
async def record_then_fail(ctx: TaskContext, key: str) -> None:
    count(key)
    ctx.session.add(Record(key=key))
    await ctx.session.flush()  # the row is in the transaction...
    raise ctx.validation_error("refusing after the write", key=key)  # ...and rolled back


@simple_task(name="tests.fail_validation", retry_policy="aggressive")
def fail_validation(ctx: TaskContext, key: str) -> None:
    count(key)
    raise ctx.validation_error("bad input", key=key)


@simple_task(name="tests.fail_not_found", retry_policy="aggressive")
def fail_not_found(ctx: TaskContext, key: str) -> None:
    count(key)
    raise ctx.not_found_error("no such thing", key=key)


@db_task(name="tests.duplicate_key", retry_policy="aggressive")
async def duplicate_key(ctx: TaskContext, key: str) -> None:
    count(key)
    ctx.session.add(Record(key=key))
    ctx.session.add(Record(key=key))
    await ctx.session.flush()  # IntegrityError: a constraint violation is not retried


@simple_task(name="tests.always_fails", retry_policy="standard")
def always_fails(ctx: TaskContext, key: str, error: str = "RuntimeError") -> None:
    count(key)
    errors: dict[str, type[Exception]] = {
        "RuntimeError": RuntimeError,
        "TimeoutError": TimeoutError,
        "asyncio.TimeoutError": asyncio.TimeoutError,
    }
    raise errors[error](f"attempt {ctx.attempt} failed")


@simple_task(name="tests.fails_until", retry_policy="aggressive")
async def fails_until(ctx: TaskContext, key: str, succeed_on: int) -> dict[str, Any]:
    count(key)
    if ctx.attempt < succeed_on:
        raise ConnectionError(f"attempt {ctx.attempt}")
    return ctx.success_result(attempt=ctx.attempt)


@db_task(name="tests.terminated_backend", retry_policy="aggressive")
async def terminated_backend(ctx: TaskContext, key: str) -> dict[str, Any]:
    """First attempt: PostgreSQL terminates our own connection (SQLSTATE 57P01)."""
    count(key)
    if ctx.attempt == 0:
        await ctx.session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    ctx.session.add(Record(key=key, attempt=ctx.attempt))
    return ctx.success_result(attempt=ctx.attempt)


@db_task(name="tests.deadlock", retry_policy="aggressive")
async def deadlock(ctx: TaskContext, key: str, dsn: str) -> dict[str, Any]:
    """First attempt: a real deadlock between our session and a second connection."""
    count(key)
    if ctx.attempt == 0:
        await _deadlock_with_other_connection(ctx, key, dsn)
    ctx.session.add(Record(key=key, attempt=ctx.attempt))
    return ctx.success_result(attempt=ctx.attempt)


async def _deadlock_with_other_connection(ctx: TaskContext, key: str, dsn: str) -> None:
    a, b = f"{key}-a", f"{key}-b"
    other = await asyncpg.connect(dsn)
    try:
        await other.execute(
            "INSERT INTO test_records (key, attempt, worker_pid) VALUES ($1, 0, 0), ($2, 0, 0)",
            a,
            b,
        )
        session = ctx.session
        await session.execute(text("SET LOCAL deadlock_timeout = '50ms'"))
        await session.execute(text("UPDATE test_records SET attempt = 1 WHERE key = :k"), {"k": a})
        transaction = other.transaction()
        await transaction.start()
        await other.execute("SET LOCAL deadlock_timeout = '10s'")
        await other.execute("UPDATE test_records SET attempt = 2 WHERE key = $1", b)

        # The other connection starts waiting first; PostgreSQL checks once,
        # deadlock_timeout after a wait starts, so our session (shorter timeout,
        # later wait) is the one that detects the deadlock and fails.
        blocker = asyncio.ensure_future(
            other.execute("UPDATE test_records SET attempt = 2 WHERE key = $1", a)
        )
        await asyncio.sleep(0.2)
        try:
            await session.execute(
                text("UPDATE test_records SET attempt = 1 WHERE key = :k"), {"k": b}
            )
        finally:
            await blocker
            await transaction.rollback()
    finally:
        await other.execute("DELETE FROM test_records WHERE key = ANY($1::text[])", [a, b])
        await other.close()


@simple_task(name="tests.where_am_i", retry_policy="no_retry", queue="default")
def where_am_i(ctx: TaskContext) -> str:
    return ctx.queue


@simple_task(name="tests.urgent", retry_policy="no_retry", queue="high_priority")
def urgent(ctx: TaskContext) -> str:
    return ctx.queue


@simple_task(name="tests.later", retry_policy="no_retry", queue="low_priority")
def later(ctx: TaskContext) -> str:
    return ctx.queue


@db_task(name="tests.sleep_in_db", retry_policy="no_retry", soft_time_limit=1, time_limit=20)
async def sleep_in_db(ctx: TaskContext, seconds: float) -> None:
    await ctx.session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})


@simple_task(name="tests.kill_own_process", retry_policy="standard")
def kill_own_process(ctx: TaskContext, key: str, survive_on: int = 99) -> dict[str, Any]:
    count(key)
    if ctx.attempt < survive_on:
        os.kill(os.getpid(), signal.SIGKILL)
    return ctx.success_result(attempt=ctx.attempt)


@simple_task(name="tests.sleep_sync", retry_policy="no_retry", soft_time_limit=1, time_limit=20)
def sleep_sync(ctx: TaskContext, seconds: float) -> None:
    time.sleep(seconds)


@simple_task(name="tests.echo", retry_policy="no_retry")
def echo(ctx: TaskContext, **payload: Any) -> dict[str, Any]:
    return ctx.success_result(**payload)


@simple_task(name="tests.progress_after_retry", retry_policy="aggressive")
async def progress_after_retry(ctx: TaskContext, key: str) -> dict[str, Any]:
    """Fails once, then publishes progress and waits for ``release:{key}``."""
    if ctx.attempt == 0:
        raise ConnectionError("first attempt fails")
    ctx.log_progress(done=1, total=2)
    for _ in range(600):
        if counter().exists(f"release:{key}"):
            break
        await asyncio.sleep(0.05)
    return ctx.success_result(attempt=ctx.attempt)


@db_task(name="tests.record_then_return_unstorable", retry_policy="aggressive")
async def record_then_return_unstorable(ctx: TaskContext, key: str) -> Any:
    """Writes a row, then returns a value JSON cannot hold (a set)."""
    count(key)
    ctx.session.add(Record(key=key))
    return {"keys": {key}}


@simple_task(name="tests.return_unstorable", retry_policy="aggressive")
def return_unstorable(ctx: TaskContext, key: str) -> Any:
    count(key)
    return object()
