"""Tasks of the fault tests (tests/reliability): each records its completion in PostgreSQL.

``completions`` counts how many times a run committed, so a task completed
twice is visible; ``attempts`` lists the attempt numbers that committed.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from app.core.background import TaskContext, db_task, simple_task

_RECORD = text(
    "INSERT INTO reliability_completions (key, completions, attempts) "
    "VALUES (:key, 1, :attempt) "
    "ON CONFLICT (key) DO UPDATE SET completions = reliability_completions.completions + 1, "
    "attempts = reliability_completions.attempts || ',' || :attempt"
)


@db_task(name="reliability.complete", retry_policy="standard")
async def complete(ctx: TaskContext, key: str, hold: float = 0.0) -> None:
    """Record one completion of ``key``; ``hold`` seconds of work first."""
    if hold:
        await asyncio.sleep(hold)
    await ctx.session.execute(_RECORD, {"key": key, "attempt": str(ctx.attempt)})


@simple_task(name="reliability.needs_two", retry_policy="no_retry")
def needs_two(ctx: TaskContext, first: str, second: str) -> str:
    """A task called with a missing argument by the poison-message test."""
    return first + second
