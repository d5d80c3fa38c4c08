"""Tasks of the operations tests (dead letters, replay): their failures are the point."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from app.core.background import NonRetriableTaskError, TaskContext, db_task, simple_task
from tests.support.models import Record
from tests.support.tasks import count, counter


def blocked_key(key: str) -> str:
    return f"blocked:{key}"


@simple_task(name="tests.ops.fails_while_blocked", retry_policy="no_retry")
def fails_while_blocked(ctx: TaskContext, key: str, payload: Any = None) -> dict[str, Any]:
    """Fails for good while the test holds ``blocked:<key>`` in Redis; succeeds once it is gone."""
    count(key)
    if counter().exists(blocked_key(key)):
        raise NonRetriableTaskError(f"{key} is blocked")
    return ctx.success_result(key=key, attempt=ctx.attempt)


@simple_task(name="tests.ops.flaky", retry_policy="standard")
def flaky(ctx: TaskContext, key: str) -> None:
    """Fails with a retriable error on every attempt: its retries run out."""
    count(key)
    raise ConnectionError(f"attempt {ctx.attempt} of {key} failed")


@db_task(name="tests.ops.write_then_wait", retry_policy="no_retry")
async def write_then_wait(ctx: TaskContext, key: str, seconds: float) -> dict[str, Any]:
    """Writes a row, then waits ``seconds`` in its transaction: a revocation must roll it back."""
    ctx.session.add(Record(key=key))
    await ctx.session.flush()
    count(key)
    await asyncio.sleep(seconds)
    return ctx.success_result(key=key)


@simple_task(name="tests.ops.ignores_soft_limit", retry_policy="no_retry")
def ignores_soft_limit(ctx: TaskContext, seconds: float) -> None:
    """Sleeps ``seconds`` through its soft time limit: only the hard limit (a kill) ends it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            continue
