"""Tasks for the tracing tests (tests/integration/test_tracing.py): each writes rows (SQL spans)."""

from __future__ import annotations

import os
from functools import cache

import redis
from sqlalchemy import text

from app.core.background import TaskContext, TaskValidationError, db_task
from tests.support.models import Record


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])


def _first_run(key: str) -> bool:
    return int(_redis().incr(f"tracing:runs:{key}")) == 1


@db_task(name="tracing.write", retry_policy="no_retry")
async def write(ctx: TaskContext, key: str) -> str:
    """Insert one row: a run span with SQL spans under it, and log lines in between."""
    ctx.log_info("Writing the row", key=key)
    ctx.session.add(Record(key=key, attempt=ctx.attempt))
    await ctx.session.flush()
    ctx.log_info("Row written", key=key)
    return key


@db_task(name="tracing.flaky", retry_policy="aggressive")
async def flaky(ctx: TaskContext, key: str) -> str:
    """Fails its first attempt (a retriable error), writes its row on the second."""
    await ctx.session.execute(text("SELECT 1"))
    if _first_run(key):
        raise ConnectionError("service hiccup")
    ctx.session.add(Record(key=key, attempt=ctx.attempt))
    return key


@db_task(name="tracing.doomed", retry_policy="no_retry")
async def doomed(ctx: TaskContext, key: str) -> str:
    """Fails for good on its first run (a dead letter); a replay succeeds."""
    await ctx.session.execute(text("SELECT 1"))
    if _first_run(key):
        raise TaskValidationError("refused on purpose")
    ctx.session.add(Record(key=key, attempt=ctx.attempt))
    return key
