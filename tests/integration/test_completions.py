"""The completion rows behind run-once db tasks, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from app.core.background.internals import completions
from app.core.background.internals.completions import CompletionLog
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
            ddl, lock = completions._CREATE, completions._CREATE_LOCK_ID
            await asyncio.gather(*(create_table(engine, ddl, lock) for engine in engines))
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
