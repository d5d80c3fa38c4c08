"""Where deduplication leases live: Redis, or a table in the SQL database.

A lease is ``key -> (token, expiry)``. Every change is atomic and conditional
on the holder's token, so a holder can only extend or release its own lease,
never a newer holder's (the trap of an unconditional ``DELETE``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Protocol

import redis
from sqlalchemy import Column, Double, MetaData, String, Table, text

from ..event_loop import LoopThread
from ..session import DatabaseConfig, create_engine, ensure_table

# The value a revoked or expired task id is kept under: not a holder's token.
REVOKED = "revoked"


class LeaseStore(Protocol):
    def acquire(self, key: str, token: str, ttl: float) -> str | None:
        """Take the lease if free (or expired); the holder afterwards (``token`` if taken)."""

    def extend(self, key: str, token: str, ttl: float) -> bool:
        """Set the lease's lifetime to ``ttl`` from now if ``token`` holds it."""

    def release(self, key: str, token: str) -> bool:
        """Delete the lease if ``token`` holds it."""

    def mark_revoked(self, key: str, token: str, ttl: float) -> bool:
        """Replace ``token``'s lease (or no lease) with a ``REVOKED`` mark for ``ttl``."""

    def holder(self, key: str) -> str | None:
        """The current holder, or None."""


# -- Redis ---------------------------------------------------------------

_ACQUIRE = """
redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return redis.call('get', KEYS[1])
"""
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""
_MARK = """
local current = redis.call('get', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisLeaseStore:
    """Leases as Redis keys: ``SET NX PX`` to take, Lua compare-and-delete/extend."""

    def __init__(self, url: str, prefix: str = "background:dedup:") -> None:
        self.url = url
        self.prefix = prefix
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._pid: int | None = None

    def _script(self, name: str) -> Any:
        if self._pid != os.getpid():
            # A client inherited through fork would share its sockets with the parent.
            self._client = redis.Redis.from_url(self.url)
            self._scripts = {
                "acquire": self._client.register_script(_ACQUIRE),
                "extend": self._client.register_script(_EXTEND),
                "release": self._client.register_script(_RELEASE),
                "mark": self._client.register_script(_MARK),
            }
            self._pid = os.getpid()
        return self._scripts[name]

    def acquire(self, key: str, token: str, ttl: float) -> str | None:
        value = self._script("acquire")(keys=[self.prefix + key], args=[token, _ms(ttl)])
        return value.decode() if value is not None else None

    def extend(self, key: str, token: str, ttl: float) -> bool:
        return bool(self._script("extend")(keys=[self.prefix + key], args=[token, _ms(ttl)]))

    def release(self, key: str, token: str) -> bool:
        return bool(self._script("release")(keys=[self.prefix + key], args=[token]))

    def mark_revoked(self, key: str, token: str, ttl: float) -> bool:
        args = [token, REVOKED, _ms(ttl)]
        return bool(self._script("mark")(keys=[self.prefix + key], args=args))

    def holder(self, key: str) -> str | None:
        self._script("acquire")
        value = self._client.get(self.prefix + key)
        return value.decode() if value is not None else None


# -- SQL database --------------------------------------------------------

TABLE = "background_task_leases"

metadata = MetaData()
leases_table = Table(
    TABLE,
    metadata,
    Column("lease_key", String(255), primary_key=True),
    Column("token", String(64), nullable=False),
    Column("expires_at", Double, nullable=False),
)
# One statement, atomic on SQLite and PostgreSQL: insert, or take over an
# expired lease; a live lease makes the conflict clause do nothing.
_SQL_ACQUIRE = f"""
INSERT INTO {TABLE} (lease_key, token, expires_at) VALUES (:key, :token, :expires)
ON CONFLICT (lease_key) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at
WHERE {TABLE}.expires_at < :now
RETURNING token
"""
_SQL_HOLDER = f"SELECT token FROM {TABLE} WHERE lease_key = :key AND expires_at >= :now"
_SQL_EXTEND = f"UPDATE {TABLE} SET expires_at = :expires WHERE lease_key = :key AND token = :token"
_SQL_RELEASE = f"DELETE FROM {TABLE} WHERE lease_key = :key AND token = :token"
_SQL_MARK = f"""
INSERT INTO {TABLE} (lease_key, token, expires_at) VALUES (:key, :mark, :expires)
ON CONFLICT (lease_key) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at
WHERE {TABLE}.token = :token OR {TABLE}.expires_at < :now
RETURNING token
"""


# Any constant: the advisory lock that serializes the table's creation.
_CREATE_LOCK_ID = 0x6267_6C65_6173_65  # "bglease"; pragma: no mutate (any constant works)
# A bound on one lease call, not behaviour: pragma: no mutate
_CALL_TIMEOUT = 60.0  # pragma: no mutate
# A lease call and a release from a signal handler at once; any small size works.
_POOL_SIZE = 2  # pragma: no mutate


class DatabaseLeaseStore:
    """Leases as rows of a table with a unique key (SQLite or PostgreSQL).

    Expiry is wall-clock time of the caller: hosts that share the database
    need synchronised clocks (NTP), as with any lease.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Any = None
        self._engine_pid: int | None = None
        self._ready = asyncio.Lock()
        # Producers call from plain threads and from inside a running event loop
        # (a FastAPI endpoint), where ``asyncio.run`` is not allowed; the worker's
        # main process calls from signal handlers. A loop of our own serves them all.
        self._loop = LoopThread("dedup-leases")

    async def _execute(self, sql: str, **params: Any) -> Any:
        if self._engine_pid != os.getpid():
            # Runs on this process's one loop thread: no other coroutine can
            # interleave before the lock exists.
            self._ready = asyncio.Lock()
            self._engine, self._engine_pid = None, os.getpid()
        async with self._ready:
            if self._engine is None:
                engine = create_engine(DatabaseConfig(url=self.url, pool_size=_POOL_SIZE))
                try:
                    await ensure_table(engine, leases_table, _CREATE_LOCK_ID)
                except BaseException:
                    await engine.dispose()
                    raise
                self._engine = engine
        async with self._engine.begin() as connection:
            result = await connection.execute(text(sql), params)
            return result.first() if result.returns_rows else result.rowcount

    def close(self) -> None:
        """Dispose this process's engine (its pooled connections)."""
        if self._engine is not None and self._engine_pid == os.getpid():
            engine, self._engine = self._engine, None
            self._loop.run(engine.dispose(), _CALL_TIMEOUT)

    def _run(self, sql: str, **params: Any) -> Any:
        return self._loop.run(self._execute(sql, **params), _CALL_TIMEOUT)

    def acquire(self, key: str, token: str, ttl: float) -> str | None:
        # Two statements: a holder that releases (or expires) between them leaves
        # no holder to report, and then the insert is tried again.
        while True:
            now = time.time()
            row = self._run(_SQL_ACQUIRE, key=key, token=token, expires=now + ttl, now=now)
            if row is not None:
                return str(row.token)
            holder = self.holder(key)
            if holder is not None:
                return holder

    def extend(self, key: str, token: str, ttl: float) -> bool:
        return bool(self._run(_SQL_EXTEND, key=key, token=token, expires=time.time() + ttl))

    def release(self, key: str, token: str) -> bool:
        return bool(self._run(_SQL_RELEASE, key=key, token=token))

    def mark_revoked(self, key: str, token: str, ttl: float) -> bool:
        now = time.time()
        row = self._run(_SQL_MARK, key=key, token=token, mark=REVOKED, expires=now + ttl, now=now)
        return row is not None

    def holder(self, key: str) -> str | None:
        row = self._run(_SQL_HOLDER, key=key, now=time.time())
        return None if row is None else str(row.token)
