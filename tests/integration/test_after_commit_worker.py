"""After-commit dispatch on the session's real worker: what a rollback discards stays discarded.

The unit tests (``tests/unit/test_after_commit.py``) follow the registry through
one transaction; here the same session is used again after its rollback, and
the worker's results say which tasks were ever sent.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.core.background import celery_app
from app.core.background.fastapi import TaskSession
from app.core.background.internals.delivery.dedup import deduplicator
from app.core.background.internals.operations.status import get_task_status
from app.core.config import get_settings
from app.core.engine import engine_from_settings
from tests.support.publishes import recorded_publishes
from tests.support.tasks_fastapi import note_row

pytestmark = [pytest.mark.usefixtures("worker"), pytest.mark.redis, pytest.mark.postgres]

RESULT_TIMEOUT = 60


def in_session(session_class: type[AsyncSession], work: Any) -> Any:
    async def main() -> Any:
        engine = engine_from_settings(get_settings())
        sessions = async_sessionmaker(engine, class_=session_class, expire_on_commit=False)
        try:
            async with sessions() as session:
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(main())


@pytest.mark.parametrize("session_class", [TaskSession, AsyncSession])
@pytest.mark.parametrize("savepoint", [False, True], ids=["transaction", "savepoint"])
def test_a_rolled_back_dispatch_is_not_sent_by_the_next_commit(
    savepoint: bool, session_class: type[AsyncSession]
) -> None:
    async def work(session: AsyncSession) -> tuple[str, str]:
        # A statement first: a plain session has a transaction to roll back then.
        await session.execute(text("SELECT 1"))
        if savepoint:
            nested = await session.begin_nested()
            discarded = note_row.delay_on_commit(session, key=uuid.uuid4().hex).id
            await nested.rollback()
        else:
            discarded = note_row.delay_on_commit(session, key=uuid.uuid4().hex).id
            await session.rollback()
        # The same session goes on: its next commit sends only what it registered since.
        kept = note_row.delay_on_commit(session, key=uuid.uuid4().hex).id
        await session.commit()
        return discarded, kept

    discarded, kept = in_session(session_class, work)
    # Published in registration order: had the discarded one been kept, it would
    # have been sent (its SENT record written) before this one.
    celery_app.AsyncResult(kept).get(timeout=RESULT_TIMEOUT)
    assert get_task_status(celery_app, discarded).state == "unknown"
    assert get_task_status(celery_app, kept).state == "success"


def test_a_task_session_discards_what_was_registered_before_any_statement() -> None:
    """No transaction yet: SQLAlchemy's rollback tells no one, ``TaskSession.rollback`` does."""

    async def work(session: AsyncSession) -> tuple[str, str]:
        discarded = note_row.delay_on_commit(session, key=uuid.uuid4().hex).id
        await session.rollback()
        kept = note_row.delay_on_commit(session, key=uuid.uuid4().hex).id
        await session.commit()
        return discarded, kept

    discarded, kept = in_session(TaskSession, work)
    celery_app.AsyncResult(kept).get(timeout=RESULT_TIMEOUT)
    assert get_task_status(celery_app, discarded).state == "unknown"


def test_a_custom_id_sent_after_commit_is_deduplicated_and_a_fresh_one_is_not() -> None:
    """``task_id`` chosen by the caller: a lease held on it means no second message."""
    held, free = f"update-{uuid.uuid4().hex}", f"update-{uuid.uuid4().hex}"
    # Someone else's task holds ``held`` (as a running task with that id would).
    assert deduplicator.store.acquire(held, "another-holder", 60.0) == "another-holder"

    async def work(session: AsyncSession) -> None:
        note_row.options(task_id=held).delay_on_commit(session, key=uuid.uuid4().hex)
        note_row.options(task_id=free).delay_on_commit(session, key=uuid.uuid4().hex)
        note_row.delay_on_commit(session, key=uuid.uuid4().hex)  # a fresh id: no lease
        await session.commit()

    try:
        with recorded_publishes() as published:
            in_session(TaskSession, work)
        assert published == [note_row.name, note_row.name]  # the free id and the fresh one
        assert deduplicator.store.holder(held) == "another-holder"
        celery_app.AsyncResult(free).get(timeout=RESULT_TIMEOUT)
    finally:
        deduplicator.store.release(held, "another-holder")
