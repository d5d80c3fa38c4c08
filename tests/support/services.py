"""The real services the tests use, each test run isolated from the others.

A run takes a Redis database number of its own (claimed with SET NX in db 0,
so parallel runs never share one) and creates a PostgreSQL database of its
own; both are emptied and released at the end. A missing service skips the
tests that need it, except under REQUIRE_SERVICES=1 (CI), where it fails them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field

import pytest
import redis

REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
POSTGRES_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"

_CLAIM_TTL = 4 * 3600


@dataclass
class Services:
    redis_db: int | None = None
    redis_error: str | None = None
    postgres_db: str | None = None
    postgres_error: str | None = None
    _claim_token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def redis_url(self) -> str:
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}"

    def redis_url_for(self, db: int) -> str:
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"

    @property
    def postgres_url(self) -> str:
        base = POSTGRES_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        return f"{base}/{self.postgres_db}"

    @property
    def postgres_dsn(self) -> str:
        return POSTGRES_DSN.rsplit("/", 1)[0] + f"/{self.postgres_db}"

    def redis(self) -> redis.Redis:
        return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=self.redis_db or 0)

    # -- lifecycle --------------------------------------------------------

    def acquire(self) -> None:
        self._claim_redis()
        self._create_postgres()

    def release(self) -> None:
        if self.redis_db is not None:
            try:
                self.redis().flushdb()
                admin = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
                key = f"bgtest:claim:{self.redis_db}"
                if admin.get(key) == self._claim_token.encode():
                    admin.delete(key)
            except redis.RedisError:
                pass
        if self.postgres_db is not None:
            asyncio.run(_drop_database(self.postgres_db))

    def _claim_redis(self) -> None:
        try:
            admin = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0, socket_timeout=3)
            admin.ping()
        except redis.RedisError as exc:
            self.redis_error = f"Redis at {REDIS_HOST}:{REDIS_PORT} is not reachable ({exc})"
            return
        # Databases 1..13 go to test runs; 14 and 15 stay free for benchmarks.
        for db in range(1, 14):
            if admin.set(f"bgtest:claim:{db}", self._claim_token, nx=True, ex=_CLAIM_TTL):
                self.redis_db = db
                self.redis().flushdb()
                return
        self.redis_error = "every Redis test database (1-13) is claimed by another run"

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


def claim_extra_redis_db() -> tuple[int, str]:
    """Another free Redis database for a test that needs a broker of its own: (db, token)."""
    admin = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0, socket_timeout=3)
    token = uuid.uuid4().hex
    for db in range(1, 14):
        if admin.set(f"bgtest:claim:{db}", token, nx=True, ex=_CLAIM_TTL):
            redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).flushdb()
            return db, token
    raise RuntimeError("every Redis test database (1-13) is claimed")


def release_extra_redis_db(db: int, token: str) -> None:
    redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).flushdb()
    admin = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    if admin.get(f"bgtest:claim:{db}") == token.encode():
        admin.delete(f"bgtest:claim:{db}")
