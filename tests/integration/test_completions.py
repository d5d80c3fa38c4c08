"""The completion rows behind run-once db tasks, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from app.core.background.internals.delivery import completions
from app.core.background.internals.delivery.completions import CompletionLog, CompletionMarker
from app.core.background.internals.session import create_table
from tests.support.services import Services


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="completions-"))
        yield f"sqlite+aiosqlite:///{folder}/tasks.db"
    else:
        services: Services = request.getfixturevalue("postgres_service")
        yield services.postgres_url


def token() -> str:
    return uuid.uuid4().hex


def on_engine(url: str, scenario: Callable[[AsyncEngine], Awaitable[None]]) -> None:
    """Run ``scenario`` with an engine on ``url``, disposed afterwards."""

    async def run() -> None:
        engine = create_async_engine(url)
        try:
            await scenario(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())


def test_a_recorded_run_is_seen_only_once_committed(database_url: str) -> None:
    async def scenario(engine: AsyncEngine) -> None:
        log = CompletionLog()
        committed, rolled_back = token(), token()
        async with AsyncSession(engine) as session:
            assert not await log.completed(session, committed)
            await log.record(session, committed, "update-1", ttl=60)
            await session.commit()
        async with AsyncSession(engine) as session:
            await log.completed(session, rolled_back)
            await log.record(session, rolled_back, "update-2", ttl=60)
            await session.rollback()
        async with AsyncSession(engine) as session:
            assert await log.completed(session, committed)
            assert not await log.completed(session, rolled_back)

    on_engine(database_url, scenario)


def test_the_marker_writes_the_row_with_the_first_commit_only(database_url: str) -> None:
    async def scenario(engine: AsyncEngine) -> None:
        log = CompletionLog()
        tok, batch = token(), {"now": True}
        async with AsyncSession(engine) as session:
            assert not await log.completed(session, tok)
            marker = CompletionMarker(session, tok, "update-1", 60, lambda: batch["now"], log)
            await session.commit()  # a batch commit: not the run's completion
            assert not marker.committed
            batch["now"] = False
            await session.commit()  # the body's explicit commit: the row goes with it
            assert marker.committed
            await session.commit()  # later commits add nothing (no duplicate key)
            marker.detach()
        async with AsyncSession(engine) as session:
            assert await log.completed(session, tok)
            await log.forget(session, tok)
            assert not await log.completed(session, tok)

    on_engine(database_url, scenario)


def test_a_commit_that_finds_another_deliverys_row_commits_nothing(database_url: str) -> None:
    async def scenario(engine: AsyncEngine) -> None:
        log = CompletionLog()
        tok, key = token(), f"k-{token()}"
        async with AsyncSession(engine) as session:
            await log.completed(session, tok)
            await session.execute(text("CREATE TABLE IF NOT EXISTS marker_probe (key TEXT)"))
            await session.commit()
        async with AsyncSession(engine) as first, AsyncSession(engine) as second:
            await log.completed(first, tok)
            await log.completed(second, tok)
            await first.rollback()
            await second.rollback()
            marker = CompletionMarker(second, tok, "update-1", 60, log=log)
            await log.record(first, tok, "update-1", ttl=60)
            await first.commit()  # the other delivery got there first
            await second.execute(text("INSERT INTO marker_probe VALUES (:k)"), {"k": key})
            with pytest.raises(completions.AlreadyCompleted):
                await second.commit()
            assert marker.duplicate
            await second.rollback()
            with pytest.raises(completions.AlreadyCompleted):
                await second.commit()  # stays refused, even if someone caught it
            marker.detach()
        async with AsyncSession(engine) as session:
            probe = text("SELECT count(*) FROM marker_probe WHERE key = :k")
            assert await session.scalar(probe, {"k": key}) == 0

    on_engine(database_url, scenario)


def test_expired_rows_are_deleted_by_a_later_run(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(engine: AsyncEngine) -> None:
        log = CompletionLog()
        old, new = token(), token()
        async with AsyncSession(engine) as session:
            await log.completed(session, old)
            await log.record(session, old, "update-old", ttl=-1)  # already expired
            await session.commit()
        monkeypatch.setattr(completions, "CLEANUP_INTERVAL", 0.0)
        async with AsyncSession(engine) as session:
            await log.record(session, new, "update-new", ttl=60)
            await session.commit()
        async with AsyncSession(engine) as session:
            rows = await session.execute(
                text(f"SELECT token FROM {completions.TABLE} WHERE token IN (:a, :b)"),
                {"a": old, "b": new},
            )
            assert [row[0] for row in rows] == [new]

    on_engine(database_url, scenario)


def test_processes_creating_the_table_at_once_do_not_fail(postgres_service: Services) -> None:
    """Concurrent CREATE TABLE IF NOT EXISTS can fail in PostgreSQL; the lock prevents it."""

    async def scenario() -> None:
        schema = f"completions_{uuid.uuid4().hex[:8]}"
        admin = create_async_engine(postgres_service.postgres_url)
        async with admin.begin() as connection:
            await connection.execute(text(f"CREATE SCHEMA {schema}"))
        engines = [
            create_async_engine(
                postgres_service.postgres_url,
                connect_args={"server_settings": {"search_path": schema}},
            )
            for _ in range(8)
        ]
        try:
            table, lock = completions.completions_table, completions._CREATE_LOCK_ID
            await asyncio.gather(*(create_table(engine, table, lock) for engine in engines))
        finally:
            for engine in engines:
                await engine.dispose()
            async with admin.begin() as connection:
                await connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            await admin.dispose()

    asyncio.run(scenario())


def test_a_second_delivery_recording_the_same_run_is_told_so(database_url: str) -> None:
    """Two deliveries of one message ran at once: the later insert reports the row taken."""

    async def scenario(engine: AsyncEngine) -> None:
        log = CompletionLog()
        run = token()
        async with AsyncSession(engine) as first:
            await log.completed(first, run)
            assert await log.record(first, run, "update-1", ttl=60)
            await first.commit()
        async with AsyncSession(engine) as second:
            assert not await log.record(second, run, "update-1", ttl=60)
            await second.rollback()

    on_engine(database_url, scenario)


# -- under mutation (scripts/mutation.sh completions) --------------------------


def completion_rows(session: AsyncSession, tok: str) -> Awaitable[int | None]:
    query = text(f"SELECT count(*) FROM {completions.TABLE} WHERE token = :t")
    return session.scalar(query, {"t": tok})


def test_a_row_lives_for_its_ttl_and_cleanup_runs_at_most_once_an_interval(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live row survives a cleanup; expiry is now + ttl; cleanup waits an interval."""

    async def scenario(engine: AsyncEngine) -> None:
        log = CompletionLog()
        live, expired = token(), token()
        async with AsyncSession(engine) as session:
            await log.completed(session, live)
            await log.record(session, live, "update-live", ttl=60)
            await session.commit()
            expires_at = await session.scalar(
                text(f"SELECT expires_at FROM {completions.TABLE} WHERE token = :t"), {"t": live}
            )
        assert 55 < expires_at - time.time() <= 60
        # The first record of this log cleaned up; the next ones within the hour do not.
        async with AsyncSession(engine) as session:
            await log.record(session, expired, "update-expired", ttl=-1)
            await session.commit()
        async with AsyncSession(engine) as session:
            await log.record(session, token(), "update-later", ttl=60)
            await session.commit()
            assert await completion_rows(session, expired) == 1  # no cleanup yet
        monkeypatch.setattr(completions, "CLEANUP_INTERVAL", 0.0)
        async with AsyncSession(engine) as session:
            await log.record(session, token(), "update-last", ttl=60)
            await session.commit()
            assert await completion_rows(session, expired) == 0
            assert await completion_rows(session, live) == 1  # not expired: kept

    on_engine(database_url, scenario)


def test_a_detached_marker_writes_nothing(database_url: str) -> None:
    async def scenario(engine: AsyncEngine) -> None:
        log = CompletionLog()
        tok = token()
        async with AsyncSession(engine) as session:
            await log.completed(session, tok)
            marker = CompletionMarker(session, tok, "update-1", 60, log=log)
            marker.detach()
            marker.detach()  # twice is harmless
            await session.commit()
            assert not marker.committed
            assert await completion_rows(session, tok) == 0

    on_engine(database_url, scenario)


def test_a_rollback_before_the_first_commit_does_not_stop_the_row(database_url: str) -> None:
    """The run's first commit after a rollback (a failed commit, a body's own) still writes it."""

    async def scenario(engine: AsyncEngine) -> None:
        log = CompletionLog()
        tok = token()
        async with AsyncSession(engine) as session:
            await log.completed(session, tok)
            marker = CompletionMarker(session, tok, "update-1", 60, log=log)
            await session.rollback()
            await session.commit()
            assert marker.committed
            marker.detach()
        async with AsyncSession(engine) as session:
            assert await log.completed(session, tok)

    on_engine(database_url, scenario)
