"""Tasks for the tests of the testing helpers (issue 3): one of each kind.

``my_db_task`` is the specification's ``@db_task`` example, the task of its
"Testing" example, both copied exactly as written.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import func, select

from app.core.background import TaskContext, db_task, simple_task
from tests.support.models import Record


class _SomeCrud:
    """The specification's ``some_crud``: any CRUD object with ``get(session, id)``."""

    async def get(self, session: Any, entity_id: str) -> Any:
        return await session.get(Record, entity_id)


some_crud = _SomeCrud()


# The specification's "@db_task" example, as written (it logs nothing itself).
@db_task(
    name="module.db_task_name",
    retry_policy="standard",
    queue="default"
)  # fmt: skip
async def my_db_task(ctx: TaskContext, entity_id: str):  # type: ignore[no-untyped-def]
    result = await some_crud.get(ctx.session, entity_id)  # noqa: F841 - as the spec has it
    # Auto-commits on success, auto-rollbacks on error
    return ctx.success_result(entity_id=entity_id)


@db_task(name="tests.testing.flaky", retry_policy="standard")
async def flaky(ctx: TaskContext, key: str) -> None:
    """Fails with a retriable error (a retry on a worker, while retries are left)."""
    raise ConnectionError(f"upstream unavailable for {key}")


@db_task(name="tests.testing.write_then_fail")
async def write_then_fail(ctx: TaskContext, key: str) -> None:
    ctx.session.add(Record(key=key))
    await ctx.session.flush()
    ctx.log_error("Giving up", key=key)
    raise ctx.validation_error("refusing after the write", key=key)


@db_task(name="tests.testing.write_in_batches", queue="low_priority")
async def write_in_batches(ctx: TaskContext, prefix: str, count: int) -> dict[str, Any]:
    """Commits twice inside the task: once directly, then through ``commit_batch``."""
    ctx.session.add(Record(key=f"{prefix}-0"))
    await ctx.session.commit()
    for index in range(1, count):
        ctx.session.add(Record(key=f"{prefix}-{index}"))
    await ctx.commit_batch()
    total = await ctx.session.scalar(
        select(func.count()).select_from(Record).where(Record.key.startswith(prefix))
    )
    ctx.log_success("Written", prefix=prefix, total=total)
    return ctx.success_result(written=total)


@simple_task(name="tests.testing.shout")
def shout(ctx: TaskContext, text: str) -> dict[str, Any]:
    if not text:
        ctx.log_warning("Nothing to shout")
        raise ctx.validation_error("text is empty")
    ctx.log_info("Shouting", length=len(text))
    return ctx.success_result(text=text.upper())


@simple_task(name="tests.testing.count_down")
async def count_down(ctx: TaskContext, start: int) -> dict[str, Any]:
    for done in range(1, start + 1):
        await asyncio.sleep(0)
        ctx.log_progress(done=done, total=start)
    ctx.log_success("Lift-off", start=start)
    return ctx.success_result(start=start)


@simple_task(name="tests.testing.peek_session")
def peek_session(ctx: TaskContext) -> bool:
    """A simple task that (wrongly) asks for a session: it has none, as on a worker."""
    return ctx.session is not None
