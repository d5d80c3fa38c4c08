"""Tasks for the FastAPI integration tests (dispatch after commit, outbox, status API)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from app.core.background import TaskContext, db_task, simple_task
from tests.support.models import Record
from tests.support.tasks import count, counter

WAIT_LIMIT = 60.0


@db_task(name="fastapi.note_row", retry_policy="no_retry")
async def note_row(ctx: TaskContext, key: str) -> dict[str, Any]:
    """Count the run and say whether the dispatcher's row was committed when it ran."""
    count(key)
    found = await ctx.session.scalar(select(Record.key).where(Record.key == key))
    return ctx.success_result(key=key, row_found=found is not None)


def _wait_for_release(key: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while not counter().exists(f"release:{key}"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"release:{key} never set")
        time.sleep(0.05)


@simple_task(name="fastapi.hold", retry_policy="no_retry")
def hold(ctx: TaskContext, key: str, progress: bool = False) -> dict[str, Any]:
    """Stay started (publishing progress if asked) until the test sets ``release:<key>``."""
    if progress:
        ctx.log_progress(done=1, total=4)
    _wait_for_release(key)
    return ctx.success_result(key=key)


class SlowDown(RuntimeError):
    """A retriable error that asks for a long wait (keeps the task in RETRY)."""

    retry_after = 60.0


@simple_task(name="fastapi.retry_later", retry_policy="standard")
def retry_later(ctx: TaskContext, key: str) -> None:
    count(key)
    raise SlowDown(f"try again later ({key})")
