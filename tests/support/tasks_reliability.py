"""Tasks of the fault tests (tests/reliability): each records its completion in PostgreSQL.

``completions`` counts how many times a run committed, so a task completed
twice is visible; ``attempts`` lists the attempt numbers that committed.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from sqlalchemy import text

from app.core.background import TaskContext, db_task, simple_task

_RECORD = text(
    "INSERT INTO reliability_completions (key, completions, attempts) "
    "VALUES (:key, 1, :attempt) "
    "ON CONFLICT (key) DO UPDATE SET completions = reliability_completions.completions + 1, "
    "attempts = reliability_completions.attempts || ',' || :attempt"
)


def _announce_pid(pid_file: str) -> None:
    if not os.path.exists(pid_file):
        Path(pid_file + ".tmp").write_text(str(os.getpid()))
        os.replace(pid_file + ".tmp", pid_file)  # the test never reads half a pid


@db_task(name="reliability.complete", retry_policy="standard")
async def complete(
    ctx: TaskContext,
    key: str,
    hold: float = 0.0,
    pid_file: str | None = None,
    commit_first: bool = False,
) -> None:
    """Record one completion of ``key``; ``hold`` seconds of work first.

    ``pid_file``: write this process's pid there first, so that a test can kill
    the pool process while it holds (only on the first delivery: the file exists after).
    ``commit_first``: record and commit first, then announce and hold: a kill
    then lands after the commit and before the acknowledgement, the window in
    which a redelivery completes the work a second time (unless run-once skips it).
    """
    if commit_first:
        await ctx.session.execute(_RECORD, {"key": key, "attempt": str(ctx.attempt)})
        await ctx.session.commit()
    if pid_file is not None:
        _announce_pid(pid_file)
    if hold:
        await asyncio.sleep(hold)
    if not commit_first:
        await ctx.session.execute(_RECORD, {"key": key, "attempt": str(ctx.attempt)})


@simple_task(name="reliability.needs_two", retry_policy="no_retry")
def needs_two(ctx: TaskContext, first: str, second: str) -> str:
    """A task called with a missing argument by the poison-message test."""
    return first + second
