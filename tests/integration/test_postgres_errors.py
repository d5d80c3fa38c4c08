"""Real PostgreSQL errors through asyncpg + SQLAlchemy, classified as the specification says.

asyncpg errors reach SQLAlchemy as plain ``DBAPIError``s: these tests produce
the real thing (a deadlock, a terminated backend, a unique violation) and
check the SQLSTATE-based classification.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.core.background import is_retriable
from app.core.background.internals.exceptions import sqlstate_of
from tests.support.services import Services


@pytest.fixture
async def engine(stack: Services) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(stack.postgres_url)
    yield engine
    await engine.dispose()


async def test_unique_violation_is_not_retriable(engine: AsyncEngine) -> None:
    key = uuid.uuid4().hex
    insert = text("INSERT INTO test_records (key, attempt, worker_pid) VALUES (:k, 0, 0)")
    async with engine.connect() as connection:
        await connection.execute(insert, {"k": key})
        with pytest.raises(IntegrityError) as raised:
            await connection.execute(insert, {"k": key})
    assert sqlstate_of(raised.value) == "23505"
    assert not is_retriable(raised.value)


async def test_terminated_backend_is_retriable(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        with pytest.raises(DBAPIError) as raised:
            await connection.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    error = raised.value
    # 57P01 (admin shutdown) or, as asyncpg reports it here, 08003 (connection gone).
    assert (sqlstate_of(error) or "").startswith(("57P", "08"))
    assert is_retriable(error)


async def test_deadlock_is_a_plain_dbapi_error_and_retriable(engine: AsyncEngine) -> None:
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    async with engine.begin() as setup:
        await setup.execute(
            text(
                "INSERT INTO test_records (key, attempt, worker_pid) VALUES (:a, 0, 0), (:b, 0, 0)"
            ),
            {"a": a, "b": b},
        )
    update = text("UPDATE test_records SET attempt = attempt + 1 WHERE key = :k")
    async with engine.connect() as first, engine.connect() as second:
        # The first connection detects the deadlock, so its statement is the one that fails.
        await first.execute(text("SET LOCAL deadlock_timeout = '50ms'"))
        await second.execute(text("SET LOCAL deadlock_timeout = '10s'"))
        await first.execute(update, {"k": a})
        await second.execute(update, {"k": b})

        # The second connection waits first; PostgreSQL checks for a deadlock
        # once, deadlock_timeout after a wait starts, so the first connection,
        # which starts waiting later with the shorter timeout, finds it.
        blocker = asyncio.create_task(second.execute(update, {"k": a}))
        await asyncio.sleep(0.2)
        with pytest.raises(DBAPIError) as raised:
            await first.execute(update, {"k": b})
        await first.rollback()
        await blocker
        await second.rollback()
    error = raised.value
    assert sqlstate_of(error) == "40P01"
    assert not isinstance(error, IntegrityError)
    assert is_retriable(error)


@pytest.mark.parametrize(
    ("credentials", "database", "sqlstate"),
    [("nosuchrole:secret-pw", "postgres", "28000"), ("postgres", "no_such_database", "3D000")],
)
async def test_database_configuration_errors_are_not_retried(
    stack: Services, credentials: str, database: str, sqlstate: str
) -> None:
    """A refused login or an unknown database: the next attempt would meet it too."""
    host = stack.postgres_url.split("@", 1)[1].rsplit("/", 1)[0]
    engine = create_async_engine(f"postgresql+asyncpg://{credentials}@{host}/{database}")
    try:
        with pytest.raises(DBAPIError) as raised:
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    assert sqlstate_of(raised.value) == sqlstate
    assert not is_retriable(raised.value)
