"""Dispatch after commit: which dispatches a session's events keep, in which order.

The sending itself is replaced by a recorder here; the integration tests send
for real (tests/integration/test_fastapi_integration.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

from app.core.background import TaskArgumentError, TaskDispatchError
from app.core.background.fastapi import TaskSession, pending_dispatches
from app.core.background.internals.delivery import after_commit
from app.core.background.internals.delivery.outbox import outbox_table
from app.core.background.internals.delivery.publish import Message
from tests.support.tasks_fastapi import note_row


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    keys: list[str] = []

    def record(dispatch: after_commit.Dispatch) -> None:
        keys.append(dispatch.kwargs["key"])

    monkeypatch.setattr(after_commit.Dispatch, "send", record)
    return keys


@pytest.fixture
async def sessions() -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_async_engine("sqlite+aiosqlite://")
    yield async_sessionmaker(engine)
    await engine.dispose()


async def test_commit_sends_every_dispatch_in_order(sessions: Any, sent: list[str]) -> None:
    async with sessions() as session:
        ids = [note_row.delay_on_commit(session, key=k).id for k in "abc"]
        assert [d.task_id for d in pending_dispatches(session)] == ids
        assert sent == []
        await session.commit()
        assert sent == ["a", "b", "c"]
        assert pending_dispatches(session) == []
        await session.commit()  # nothing is sent twice
    assert sent == ["a", "b", "c"]


async def test_rollback_and_close_discard(sessions: Any, sent: list[str]) -> None:
    async with sessions() as session:
        note_row.delay_on_commit(session, key="rolled back")
        await session.execute(text("SELECT 1"))
        await session.rollback()
        note_row.delay_on_commit(session, key="closed")
    async with sessions() as session:
        note_row.delay_on_commit(session, key="next session")
        await session.commit()
    assert sent == ["next session"]


async def test_savepoint_rollback_discards_only_its_own(sessions: Any, sent: list[str]) -> None:
    async with sessions() as session:
        await session.execute(text("SELECT 1"))
        note_row.delay_on_commit(session, key="outer")
        savepoint = await session.begin_nested()
        note_row.delay_on_commit(session, key="inner")
        await savepoint.rollback()
        async with session.begin_nested():
            note_row.delay_on_commit(session, key="released")
        await session.commit()
    assert sent == ["outer", "released"]


async def test_task_session_sends_from_commit_and_from_begin_block(sent: list[str]) -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    sessions = async_sessionmaker(engine, class_=TaskSession)
    async with sessions() as session:
        note_row.delay_on_commit(session, key="commit")
        await session.commit()
        assert sent == ["commit"]  # sent (in a thread) before commit() returned
    async with sessions() as session:
        async with session.begin():
            note_row.delay_on_commit(session, key="begin")
        assert sent == ["commit"]  # the transaction committed: sent when the session closes
    assert sent == ["commit", "begin"]
    await engine.dispose()


async def test_bad_arguments_fail_at_registration(sessions: Any, sent: list[str]) -> None:
    async with sessions() as session:
        with pytest.raises(TaskArgumentError, match=r"^fastapi\.note_row: .*'wrong'"):
            note_row.delay_on_commit(session, key="k", wrong=1)  # type: ignore[call-arg]
        with pytest.raises(TaskArgumentError, match=r"^fastapi\.note_row: .*JSON"):
            note_row.delay_on_commit(session, key=object())  # type: ignore[arg-type]
        assert pending_dispatches(session) == []


async def test_a_failed_send_goes_to_the_outbox_and_the_rest_still_go_out(
    sessions: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sent: list[str] = []

    def send(dispatch: after_commit.Dispatch) -> None:
        if dispatch.kwargs["key"] == "boom":
            raise ConnectionError("broker down")
        sent.append(dispatch.kwargs["key"])

    monkeypatch.setattr(after_commit.Dispatch, "send", send)
    async with sessions() as session:
        await session.run_sync(lambda s: outbox_table.create(s.connection()))
        await session.commit()
        ids = {k: note_row.delay_on_commit(session, key=k).id for k in ("a", "boom", "c")}
        await session.commit()  # committed: the failed one is kept, not raised
        pending = (await session.execute(outbox_table.select())).all()
    assert sent == ["a", "c"]
    assert [row.task_id for row in pending] == [ids["boom"]]
    (record,) = caplog.records
    assert record.message.startswith("Dispatch after commit failed")
    assert record.fields["task_id"] == ids["boom"]  # type: ignore[attr-defined]


def _unsent(*keys: str) -> list[after_commit.Unsent]:
    return [
        after_commit.Unsent(
            after_commit.Dispatch(Message(note_row, (), {"key": key}), None, deduplicated=False),
            ConnectionError(f"broker down ({key})"),
        )
        for key in keys
    ]


def test_tasks_reported_lost_name_the_first_one_and_every_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(note_row.app.conf, "background_after_commit_fallback", "error")
    failed = _unsent("first", "second")
    with pytest.raises(TaskDispatchError) as raised:
        after_commit.keep_unsent(Session(), failed)
    first, second = (u.dispatch.task_id for u in failed)
    assert raised.value.task_ids == (first, second)
    assert f"(first: {note_row.name} [{first}]: broker down (first))" in str(raised.value)


@pytest.mark.parametrize("outer_transaction", [True, False])
def test_the_outbox_fallback_stays_in_a_connections_transaction(outer_transaction: bool) -> None:
    """A session bound to one connection (a test's outer transaction): the rows join it.

    In a transaction, through a savepoint (the transaction goes on); without
    one, in a transaction of its own, committed.
    """
    from sqlalchemy import create_engine

    engine = create_engine("sqlite://")
    with engine.connect() as connection:
        outbox_table.create(connection)
        connection.commit()
        if outer_transaction:
            connection.begin()
        failed = _unsent("kept")
        after_commit.keep_unsent(Session(bind=connection), failed)
        assert connection.in_transaction() is outer_transaction
        rows = connection.execute(outbox_table.select()).all()
        assert [row.task_id for row in rows] == [failed[0].dispatch.task_id]
    engine.dispose()


async def test_a_dispatch_registered_before_any_statement_belongs_to_the_outer_transaction(
    sessions: Any, sent: list[str]
) -> None:
    """Plain AsyncSession: discarded by the outer rollback, kept by a savepoint's."""
    async with sessions() as session:
        note_row.delay_on_commit(session, key="early-rolled-back")
        await session.execute(text("SELECT 1"))
        await session.rollback()
        note_row.delay_on_commit(session, key="early-kept")
        nested = await session.begin_nested()
        await nested.rollback()
        await session.commit()
    assert sent == ["early-kept"]
