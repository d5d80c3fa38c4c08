"""Tasks for the deduplication tests (tests/integration/test_dedup.py).

Each run of a body adds a row to ``test_records`` (key ``{key}:{random}``)
from a connection of its own, committed at once, so a test counts executions
in the database even for runs that fail, retry or are killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import asyncpg

from app.core.background import TaskContext, db_task, periodic, simple_task
from app.core.background.internals.observability.hooks import TaskHook, hooks
from tests.support.models import Record


def _dsn() -> str:
    return os.environ["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")


async def mark(key: str, attempt: int = 0) -> None:
    connection = await asyncpg.connect(_dsn())
    try:
        await connection.execute(
            "INSERT INTO test_records (key, attempt, worker_pid) VALUES ($1, $2, $3)",
            f"{key}:{uuid.uuid4().hex}",
            attempt,
            os.getpid(),
        )
    finally:
        await connection.close()


class SlowDown(RuntimeError):
    """A retriable error that asks for a retry no sooner than ``retry_after`` seconds."""

    retry_after = 3.0


@simple_task(name="tests.dedup.run", retry_policy="standard")
async def run(ctx: TaskContext, key: str, seconds: float = 0.0) -> str:
    await mark(key, ctx.attempt)
    await asyncio.sleep(seconds)
    return ctx.task_id


@simple_task(name="tests.dedup.fail", retry_policy="no_retry")
async def fail(ctx: TaskContext, key: str) -> None:
    await mark(key, ctx.attempt)
    raise ctx.validation_error("refused", key=key)


@simple_task(name="tests.dedup.retry_once", retry_policy="aggressive")
async def retry_once(ctx: TaskContext, key: str) -> int:
    await mark(key, ctx.attempt)
    if ctx.attempt == 0:
        raise SlowDown("first attempt fails")
    return ctx.attempt


@simple_task(name="tests.dedup.hang", retry_policy="no_retry", time_limit=4, soft_time_limit=3)
async def hang(ctx: TaskContext, key: str) -> None:
    await mark(key, ctx.attempt)
    await asyncio.sleep(60)


@periodic(2.0, name="tests.dedup.tick-every-2s")
@simple_task(name="tests.dedup.tick", retry_policy="no_retry")
async def tick(ctx: TaskContext) -> None:
    await mark(f"tick:{ctx.task_id}", ctx.attempt)


@simple_task(name="tests.dedup.die_once", retry_policy="aggressive")
async def die_once(ctx: TaskContext, key: str) -> int:
    await mark(key, ctx.attempt)
    if ctx.attempt == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # the pool process dies with the task
    return ctx.attempt


@simple_task(name="tests.dedup.die_always", retry_policy="no_retry")
async def die_always(ctx: TaskContext, key: str) -> None:
    await mark(key, ctx.attempt)
    os.kill(os.getpid(), signal.SIGKILL)


@db_task(name="tests.dedup.commit_then_die", retry_policy="aggressive")
async def commit_then_die(ctx: TaskContext, key: str) -> int:
    """Writes through ctx.session; its first run's process dies right after the commit.

    ``{key}-entered`` rows (their own connection) count how often the body ran.
    """
    await mark(f"{key}-entered", ctx.attempt)
    ctx.session.add(Record(key=f"{key}:{ctx.attempt}", attempt=ctx.attempt, worker_pid=os.getpid()))
    return ctx.attempt


class _DieAfterFirstCommit(TaskHook):
    """Kills the pool process after ``commit_then_die``'s first commit, before the ack."""

    def on_success(self, ctx: TaskContext, result: object, duration: float) -> None:
        if ctx.task_name == commit_then_die.name and ctx.attempt == 0:
            os.kill(os.getpid(), signal.SIGKILL)


hooks.register(_DieAfterFirstCommit())


@db_task(name="tests.dedup.commit_explicitly_then_die", retry_policy="aggressive")
async def commit_explicitly_then_die(ctx: TaskContext, key: str) -> int:
    """Commits its write itself; its first run's process dies right after that commit."""
    ctx.session.add(Record(key=f"{key}:{ctx.attempt}", attempt=ctx.attempt, worker_pid=os.getpid()))
    await ctx.session.commit()
    if ctx.attempt == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return ctx.attempt


@db_task(name="tests.dedup.commit_explicitly_then_fail", retry_policy="aggressive")
async def commit_explicitly_then_fail(ctx: TaskContext, key: str) -> int:
    """Commits its write itself, then its first run fails with a retriable error."""
    ctx.session.add(Record(key=f"{key}:{ctx.attempt}", attempt=ctx.attempt, worker_pid=os.getpid()))
    await ctx.session.commit()
    if ctx.attempt == 0:
        raise ConnectionError("upstream went away after the commit")
    return ctx.attempt


@db_task(name="tests.dedup.batch_then_die", retry_policy="aggressive")
async def batch_then_die(ctx: TaskContext, key: str) -> int:
    """A bulk job: its first run's process dies after its first batch."""
    ctx.session.add(Record(key=f"{key}:{ctx.attempt}", attempt=ctx.attempt, worker_pid=os.getpid()))
    await ctx.commit_batch()
    if ctx.attempt == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return ctx.attempt


@db_task(name="tests.dedup.hold_then_write", retry_policy="aggressive")
async def hold_then_write(ctx: TaskContext, key: str, seconds: float) -> int:
    """Enters (counted), holds ``seconds`` inside its transaction, then writes through it."""
    await mark(f"{key}-entered", ctx.attempt)
    await asyncio.sleep(seconds)
    ctx.session.add(
        Record(key=f"{key}:{uuid.uuid4().hex}", attempt=ctx.attempt, worker_pid=os.getpid())
    )
    return ctx.attempt


class _MarkHoldThenWriteDone(TaskHook):
    """``{key}-done``: a delivery of ``hold_then_write`` ended (committed, or skipped)."""

    def on_success(self, ctx: TaskContext, result: object, duration: float) -> None:
        if ctx.task_name == hold_then_write.name:
            # After the run's commit, outside its loop: a short loop of its own.
            asyncio.run(mark(f"{ctx.task_id.removeprefix('update-')}-done", ctx.attempt))


hooks.register(_MarkHoldThenWriteDone())


@simple_task(
    name="tests.dedup.outlive_soft_limit", retry_policy="no_retry", time_limit=3, soft_time_limit=1
)
def outlive_soft_limit(ctx: TaskContext, key: str) -> None:
    """Ignores its soft time limit: only the hard one (the pool kills the process) ends it."""
    from celery.exceptions import SoftTimeLimitExceeded

    asyncio.run(mark(key, ctx.attempt))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            time.sleep(0.1)
        except SoftTimeLimitExceeded:
            continue


@simple_task(name="tests.dedup.reject_once", retry_policy="no_retry")
async def reject_once(ctx: TaskContext, key: str, hold: float = 0.0) -> int:
    """The first run gives its message back (Reject, requeue); the next holds, then ends."""
    from celery.exceptions import Reject

    await mark(key, ctx.attempt)
    if await _marks(key) == 1:
        raise Reject("not now", requeue=True)
    await asyncio.sleep(hold)
    return 2


@simple_task(name="tests.dedup.ignore", retry_policy="no_retry")
async def ignore(ctx: TaskContext, key: str) -> None:
    """Ends with Celery's ``Ignore``: no result, the run is over."""
    from celery.exceptions import Ignore

    await mark(key, ctx.attempt)
    raise Ignore()


@simple_task(name="tests.dedup.reject_for_good", retry_policy="no_retry")
async def reject_for_good(ctx: TaskContext, key: str) -> None:
    """Gives its message up for good (``Reject`` without requeue): the run is over."""
    from celery.exceptions import Reject

    await mark(key, ctx.attempt)
    raise Reject("not wanted", requeue=False)


async def _marks(key: str) -> int:
    """How many runs of ``key`` have been marked so far."""
    connection = await asyncpg.connect(_dsn())
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM test_records WHERE key LIKE $1", f"{key}:%"
        )
    finally:
        await connection.close()
    return int(count)
