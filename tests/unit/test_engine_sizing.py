"""The engine's pool: sized for the process's concurrency unless DATABASE_POOL_SIZE says."""

from __future__ import annotations

import asyncio

import pytest

from app.core.background.database import DatabaseConfig, create_database_engine
from app.core.background.internals.session import (
    CONCURRENT_POOL_CAP,
    DEFAULT_POOL_SIZE,
    pool_size_for,
)

URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/never_connected"


@pytest.mark.parametrize(
    ("concurrency", "expected"),
    [(1, DEFAULT_POOL_SIZE), (3, DEFAULT_POOL_SIZE), (16, 16), (100, CONCURRENT_POOL_CAP)],
)
def test_unset_the_pool_follows_the_concurrency_up_to_the_cap(
    concurrency: int, expected: int
) -> None:
    assert pool_size_for(DatabaseConfig(url=URL), concurrency) == expected


def test_a_configured_size_wins_whatever_the_concurrency() -> None:
    assert pool_size_for(DatabaseConfig(url=URL, pool_size=7), 100) == 7


def test_two_workers_at_any_concurrency_stay_under_postgresqls_default_limit() -> None:
    """PostgreSQL's default max_connections is 100 (3 of them reserved for superusers)."""
    config = DatabaseConfig(url=URL)
    per_process = pool_size_for(config, 10_000) + config.max_overflow
    assert 2 * per_process <= 100 - 3 - (DEFAULT_POOL_SIZE + config.max_overflow)


def test_the_engine_gets_size_overflow_and_timeout() -> None:
    engine = create_database_engine(
        DatabaseConfig(url=URL, max_overflow=3, pool_timeout=1.5), concurrency=12
    )
    try:
        pool = engine.pool
        assert pool.size() == 12  # type: ignore[attr-defined]
        assert pool._max_overflow == 3  # type: ignore[attr-defined]
        assert pool.timeout() == 1.5  # type: ignore[attr-defined]
    finally:
        asyncio.run(engine.dispose())
