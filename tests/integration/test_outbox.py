"""The transactional outbox: a committed task survives the death of the process that wrote it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from app.core.background import celery_app
from app.core.background.outbox import relay_outbox, run_relay
from app.core.config import get_settings
from app.core.engine import engine_from_settings
from tests.support import tasks_fastapi
from tests.support.db import fetchval
from tests.support.models import Record
from tests.support.publishes import recorded_messages
from tests.support.services import Services

pytestmark = pytest.mark.usefixtures("worker", "own_outbox")

WAIT = 60.0
PENDING = "SELECT array_agg(task_id ORDER BY id) FROM background_outbox WHERE sent_at IS NULL"


@pytest.fixture
def own_outbox(stack: Services) -> Iterator[None]:
    """The relay sends every pending row: each test must find only its own.

    Before: no pending row at all (a row another test left would be sent by
    this test's relay). After: the test's own rows still pending (a failed
    send) are deleted, never left for the next test to send.
    """
    left = fetchval(stack, PENDING)
    assert not left, f"outbox rows another test left pending: {left}"
    yield
    fetchval(stack, "DELETE FROM background_outbox WHERE sent_at IS NULL")
    assert not fetchval(stack, PENDING)


# Writes a row and its task through the outbox, commits, and dies before any relay runs.
COMMIT_THEN_DIE = textwrap.dedent(
    """
    import asyncio, os, signal, sys

    from app.core.config import get_settings
    from app.core.engine import engine_from_settings
    from sqlalchemy.ext.asyncio import async_sessionmaker
    from tests.support import tasks_fastapi
    from tests.support.models import Record

    async def main(key):
        engine = engine_from_settings(get_settings())
        async with async_sessionmaker(engine)() as session:
            session.add(Record(key=key))
            result = tasks_fastapi.note_row.delay_via_outbox(session, key=key)
            await session.commit()
        print(result.id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main(sys.argv[1]))
    """
)


# Its own waits: writer 60 + relay 60 + result 60 = 180 s.
@pytest.mark.timeout(240)
def test_outbox_delivers_after_the_writer_is_killed(stack: Services) -> None:
    key = uuid.uuid4().hex
    writer = subprocess.run(
        [sys.executable, "-c", COMMIT_THEN_DIE, key],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert writer.returncode == -signal.SIGKILL, writer.stderr
    task_id = writer.stdout.strip()
    unsent = "SELECT count(*) FROM background_outbox WHERE task_id = $1 AND sent_at IS NULL"
    assert fetchval(stack, unsent, task_id) == 1
    assert celery_app.AsyncResult(task_id).state == "PENDING"  # nothing was sent

    relay = subprocess.run(
        [sys.executable, "-m", "app.core.background", "relay", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ},
    )
    assert relay.returncode == 0, relay.stderr
    assert "relayed" in relay.stdout

    result = celery_app.AsyncResult(task_id).get(timeout=WAIT)
    assert result == {"status": "success", "task_id": task_id, "key": key, "row_found": True}
    assert fetchval(stack, unsent, task_id) == 0


def run_in_session(work: Any) -> Any:
    async def main() -> Any:
        engine = engine_from_settings(get_settings())
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        try:
            return await work(sessions)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def test_rolled_back_outbox_row_is_never_sent(stack: Services) -> None:
    key = uuid.uuid4().hex

    async def work(sessions: Any) -> tuple[str, int]:
        async with sessions() as session:
            session.add(Record(key=key))
            task_id = tasks_fastapi.note_row.delay_via_outbox(session, key=key).id
            await session.rollback()
        await relay_outbox(sessions, celery_app)
        return task_id, 0

    task_id, _ = run_in_session(work)
    assert (
        fetchval(stack, "SELECT count(*) FROM background_outbox WHERE task_id = $1", task_id) == 0
    )


def test_relay_sends_in_order_with_chosen_options(stack: Services) -> None:
    keys = [uuid.uuid4().hex for _ in range(3)]

    async def work(sessions: Any) -> tuple[list[str], int]:
        async with sessions() as session:
            ids = []
            for k in keys:
                session.add(Record(key=k))
                ids.append(
                    tasks_fastapi.note_row.options(priority=3).delay_via_outbox(session, key=k).id
                )
            await session.commit()
        sent = 0
        with recorded_messages() as published:
            while batch := await relay_outbox(sessions, celery_app, batch_size=2):
                sent += batch
        # Published in the order written, each with the priority chosen at dispatch.
        assert published == [(task_id, 3) for task_id in ids]
        return ids, sent

    ids, sent = run_in_session(work)
    assert sent == 3  # these three, and nothing another test wrote
    for task_id, k in zip(ids, keys, strict=True):
        assert celery_app.AsyncResult(task_id).get(timeout=WAIT)["key"] == k
    sent_ids = fetchval(
        stack,
        "SELECT array_agg(task_id ORDER BY id) FROM background_outbox "
        "WHERE task_id = ANY($1) AND sent_at IS NOT NULL",
        ids,
    )
    assert list(sent_ids) == ids


def test_failed_send_keeps_the_row_and_stops_the_batch(
    stack: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = [uuid.uuid4().hex for _ in range(3)]
    sent: list[str] = []
    real_send_task = celery_app.send_task

    def second_send_fails(name: str, *args: Any, task_id: str, **options: Any) -> Any:
        # The broker goes away after the first message (what kombu raises then).
        if len(sent) == 1:
            raise ConnectionError("broker down")
        sent.append(task_id)
        return real_send_task(name, *args, task_id=task_id, **options)

    monkeypatch.setattr(celery_app, "send_task", second_send_fails)

    async def work(sessions: Any) -> list[str]:
        # Only these three are pending (own_outbox): the relay meets them first.
        async with sessions() as session:
            ids = [tasks_fastapi.note_row.delay_via_outbox(session, key=k).id for k in keys]
            await session.commit()
        assert await relay_outbox(sessions, celery_app) == 1
        return ids

    ids = run_in_session(work)
    assert sent == ids[:1]
    row = "SELECT {} FROM background_outbox WHERE task_id = $1"
    assert fetchval(stack, row.format("sent_at IS NOT NULL"), ids[0]) is True
    assert fetchval(stack, row.format("attempts"), ids[1]) == 1
    last_error = fetchval(stack, row.format("last_error"), ids[1])
    assert last_error.startswith(f"TaskDispatchError: fastapi.note_row [{ids[1]}] was not sent")
    assert "ConnectionError: broker down" in last_error
    assert fetchval(stack, row.format("sent_at IS NULL AND attempts = 0"), ids[2]) is True
    run_in_session(lambda sessions: relay_outbox(sessions, celery_app))  # deliver the rest


def test_relays_running_at_once_send_each_row_once(stack: Services) -> None:
    """Two relays on one outbox (PostgreSQL, ``FOR UPDATE SKIP LOCKED``): no row sent twice."""
    keys = [uuid.uuid4().hex for _ in range(40)]

    async def relay_until_empty(sessions: Any) -> int:
        sent = 0
        while batch := await relay_outbox(sessions, celery_app, batch_size=4):
            sent += batch
        return sent

    async def work(sessions: Any) -> tuple[list[str], list[int]]:
        async with sessions() as session:
            ids = [tasks_fastapi.note_row.delay_via_outbox(session, key=k).id for k in keys]
            await session.commit()
        # A second engine: the second relay has connections of its own.
        other = engine_from_settings(get_settings())
        try:
            other_sessions = async_sessionmaker(other, expire_on_commit=False)
            totals = await asyncio.gather(
                relay_until_empty(sessions), relay_until_empty(other_sessions)
            )
        finally:
            await other.dispose()
        return ids, list(totals)

    with recorded_messages() as published:
        ids, totals = run_in_session(work)
    assert sorted(task_id for task_id, _ in published) == sorted(ids)  # each once
    assert sum(totals) == len(ids)
    # Both relays took rows: they did run at once, each skipping the other's locked rows.
    assert min(totals) > 0, totals


def test_relay_once_raises_when_the_database_is_unreachable(refused_database: str) -> None:
    """``--once`` reports a database it cannot reach (the loop without it retries: a blip)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> None:
        engine = create_async_engine(refused_database)
        try:
            sessions = async_sessionmaker(engine, expire_on_commit=False)
            with pytest.raises(OSError, match=r"[Cc]onnect"):
                await asyncio.wait_for(run_relay(sessions, celery_app, once=True), 30)
        finally:
            await engine.dispose()

    asyncio.run(main())


@pytest.fixture
def refused_database() -> Iterator[str]:
    """A PostgreSQL URL whose port refuses connections (bound, not listening: stays ours)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{sock.getsockname()[1]}/x"


def test_a_relay_skips_rows_another_relay_holds(stack: Services) -> None:
    """A relay stuck on its rows (locked, not yet sent) does not stall another one."""
    keys = [uuid.uuid4().hex for _ in range(4)]

    async def work(sessions: Any) -> tuple[list[str], int]:
        async with sessions() as session:
            ids = [tasks_fastapi.note_row.delay_via_outbox(session, key=k).id for k in keys]
            await session.commit()
        other = engine_from_settings(get_settings())
        try:
            async with other.connect() as stuck, stuck.begin():
                # What a relay's pass holds while it publishes: the first rows, locked.
                await stuck.exec_driver_sql(
                    "SELECT id FROM background_outbox WHERE task_id = ANY($1) FOR UPDATE",
                    (ids[:2],),
                )
                sent = await asyncio.wait_for(run_relay(sessions, celery_app, once=True), 30)
        finally:
            await other.dispose()
        return ids, sent

    with recorded_messages() as published:
        ids, sent = run_in_session(work)
    assert [task_id for task_id, _ in published] == ids[2:]
    assert sent == 2
    run_in_session(lambda sessions: relay_outbox(sessions, celery_app))  # deliver the rest


def test_relay_once_drains_every_batch_and_counts_what_it_sent(
    stack: Services, caplog: pytest.LogCaptureFixture
) -> None:
    keys = [uuid.uuid4().hex for _ in range(5)]

    async def work(sessions: Any) -> int:
        async with sessions() as session:
            for k in keys:
                tasks_fastapi.note_row.delay_via_outbox(session, key=k)
            await session.commit()
        return await asyncio.wait_for(run_relay(sessions, celery_app, batch_size=2, once=True), 30)

    with caplog.at_level("INFO", logger="app.core.background.outbox"):
        assert run_in_session(work) == 5  # two full batches, then the last row
    relayed = [r for r in caplog.records if r.getMessage() == "Outbox relayed"]
    assert [r.fields["sent"] for r in relayed] == [2, 2, 1]  # type: ignore[attr-defined]
    assert not fetchval(stack, PENDING)


def test_stop_ends_the_relay_between_passes_and_every_pass_is_a_turn(stack: Services) -> None:
    """``stop`` (the CLI's SIGTERM) cuts the pause short; ``on_turn`` runs once per pass."""
    import anyio

    keys = [uuid.uuid4().hex for _ in range(3)]
    turns: list[float] = []

    async def work(sessions: Any) -> tuple[int, float]:
        async with sessions() as session:
            for k in keys:
                tasks_fastapi.note_row.delay_via_outbox(session, key=k)
            await session.commit()
        stop = anyio.Event()

        def turn() -> None:
            turns.append(time.monotonic())
            if len(turns) == 2:  # the first pass sent the rows; stop during the second pause
                asyncio.get_running_loop().call_later(0.2, stop.set)

        began = time.monotonic()
        sent = await asyncio.wait_for(
            run_relay(sessions, celery_app, interval=1.0, stop=stop, on_turn=turn), 30
        )
        return sent, time.monotonic() - began

    sent, took = run_in_session(work)
    assert sent == 3
    assert len(turns) == 2
    # Two passes, one full pause (1 s) and the cut one (0.2 s), not a second full pause.
    assert took < 1.9
    assert not fetchval(stack, PENDING)


def test_the_relay_loop_rides_out_database_errors(
    refused_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without ``once`` (run_relay's default) a failed pass is logged and tried again."""
    from sqlalchemy.ext.asyncio import create_async_engine

    turns: list[int] = []

    def failed_passes() -> int:
        return sum(r.getMessage() == "Outbox relay pass failed" for r in caplog.records)

    async def main() -> bool:
        engine = create_async_engine(refused_database)
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        relay = asyncio.ensure_future(
            run_relay(sessions, celery_app, interval=0.05, on_turn=lambda: turns.append(1))
        )
        try:
            for _ in range(600):  # at most 30 s
                if failed_passes() >= 3 or relay.done():
                    break
                await asyncio.sleep(0.05)
            return not relay.done()
        finally:
            relay.cancel()
            await asyncio.gather(relay, return_exceptions=True)
            await engine.dispose()

    with caplog.at_level("WARNING", logger="app.core.background.outbox"):
        still_running = asyncio.run(main())
    assert still_running
    assert failed_passes() >= 3
    # Its loop still turns (the relay's heartbeat, health relay): liveness holds, readiness not.
    assert len(turns) >= failed_passes()
