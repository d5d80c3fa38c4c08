"""The real services the tests use, each test run isolated from the others.

A run starts a ``redis-server`` of its own on a free port (no other program
shares it, so the run may use and flush every database number in it) and
creates a PostgreSQL database of its own; both are removed at the end. A
missing service skips the tests that need it, except under REQUIRE_SERVICES=1
(CI), where it fails them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import redis

from tests.support.redis_server import RedisServer

POSTGRES_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"

# The session's database in the run's own Redis; the others go to tests that
# need a broker of their own (``claim_extra_redis_db``).
SESSION_REDIS_DB = 0
EXTRA_REDIS_DBS = range(1, 16)


@dataclass
class Services:
    redis_server: RedisServer | None = None
    redis_error: str | None = None
    postgres_db: str | None = None
    postgres_error: str | None = None
    _free_redis_dbs: list[int] = field(default_factory=lambda: list(EXTRA_REDIS_DBS))

    @property
    def redis_db(self) -> int | None:
        return SESSION_REDIS_DB if self.redis_server is not None else None

    @property
    def redis_url(self) -> str:
        return self.redis_url_for(SESSION_REDIS_DB)

    def redis_url_for(self, db: int) -> str:
        assert self.redis_server is not None, "Redis is not available"
        return self.redis_server.url(db)

    @property
    def postgres_url(self) -> str:
        base = POSTGRES_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        return f"{base}/{self.postgres_db}"

    @property
    def postgres_dsn(self) -> str:
        return POSTGRES_DSN.rsplit("/", 1)[0] + f"/{self.postgres_db}"

    def redis(self, db: int = SESSION_REDIS_DB) -> redis.Redis:
        assert self.redis_server is not None, "Redis is not available"
        return self.redis_server.client(db)

    # -- lifecycle --------------------------------------------------------

    def acquire(self) -> None:
        self._start_redis()
        self._create_postgres()

    def release(self) -> None:
        if self.redis_server is not None:
            self.redis_server.close()
        if self.postgres_db is not None:
            asyncio.run(_drop_database(self.postgres_db))

    def _start_redis(self) -> None:
        try:
            self.redis_server = RedisServer().start()
        except (FileNotFoundError, RuntimeError) as exc:
            self.redis_error = f"cannot start the test run's own redis-server ({exc})"

    def claim_redis_db(self) -> int:
        """A database of the run's Redis that no other test uses until it is released."""
        if not self._free_redis_dbs:
            raise RuntimeError("every extra Redis database of this run is in use")
        db = self._free_redis_dbs.pop(0)
        self.redis(db).flushdb()
        return db

    def release_redis_db(self, db: int) -> None:
        self.redis(db).flushdb()
        self._free_redis_dbs.append(db)

    @contextmanager
    def private_database(self) -> Iterator[str]:
        """A PostgreSQL database of one test's own (async URL), dropped after it."""
        name = f"bgtest_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        asyncio.run(_create_database(name))
        try:
            yield self.postgres_url.rsplit("/", 1)[0] + f"/{name}"
        finally:
            asyncio.run(_drop_database(name))

    def _create_postgres(self) -> None:
        name = f"bgtest_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        try:
            asyncio.run(_create_database(name))
        except Exception as exc:  # noqa: BLE001 - reported as a skip reason
            self.postgres_error = f"PostgreSQL at {POSTGRES_DSN} is not reachable ({exc})"
            return
        self.postgres_db = name


async def _admin_connection():  # type: ignore[no-untyped-def]
    import asyncpg

    return await asyncpg.connect(POSTGRES_DSN, timeout=5)


async def _create_database(name: str) -> None:
    connection = await _admin_connection()
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


async def _drop_database(name: str) -> None:
    connection = await _admin_connection()
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@contextmanager
def private_database(services: Services) -> Iterator[tuple[str, str]]:
    """A PostgreSQL database of one test's own, with every table: (asyncpg URL, DSN).

    For a test whose code under test reads a whole table ("every entity not
    processed yet"): there, only the test's own rows exist. Dropped at the end.
    """
    assert services.postgres_db is not None, "PostgreSQL is not available"
    name = f"{services.postgres_db}_{uuid.uuid4().hex[:6]}"
    asyncio.run(_create_database(name))
    base = POSTGRES_DSN.rsplit("/", 1)[0]
    url = base.replace("postgresql://", "postgresql+asyncpg://") + f"/{name}"
    try:
        asyncio.run(_create_tables(url))
        yield url, f"{base}/{name}"
    finally:
        asyncio.run(_drop_database(name))


async def _create_tables(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    import app.models  # noqa: F401 - the registry puts every table on Base.metadata
    from app.core.database import Base
    from tests.support import models  # noqa: F401 - the tests' own tables

    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
    finally:
        await engine.dispose()


def unavailable(reason: str) -> None:
    """Skip (on a user's machine) or fail (in CI) a test whose service is missing."""
    if REQUIRE_SERVICES:
        pytest.fail(f"REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def rabbitmq_available() -> str | None:
    """None if RabbitMQ answers, else the reason it does not."""
    from kombu import Connection

    try:
        with Connection(RABBITMQ_URL, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - reported as a skip reason
        return f"RabbitMQ at {RABBITMQ_URL} is not reachable ({exc})"
    return None
