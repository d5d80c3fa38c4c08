"""Run-once for ``@db_task`` runs dispatched with a ``task_id``: a redelivery is skipped.

Delivery is at least once: a pool process killed after its task committed
but before the message was acknowledged makes the broker deliver the message
again, and the task would run a second time. For a db task dispatched with a
custom ``task_id`` (deduplicated, so its message carries the lease token) the
framework writes a completion row keyed by that token *in the task's own
transaction*: the task's writes and the row commit together or not at all. A
redelivered message finds the row and is skipped, so its work is done once.

A later dispatch with the same ``task_id`` has a new token and runs normally.
Rows are kept for the lease lifetime (the longest a message with that token
can still be delivered) and deleted afterwards, at most once an hour per
process, inside a task's transaction.

Tasks without a custom id pay nothing; tasks with one pay one indexed SELECT
and one INSERT in a transaction they open anyway. No library offers this (it
must share the task's session), hence this module.
"""

from __future__ import annotations

import os
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from .session import create_table

TABLE = "background_task_completions"

_CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    token VARCHAR(64) PRIMARY KEY,
    task_id VARCHAR(255) NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
)
"""
_SELECT = text(f"SELECT 1 FROM {TABLE} WHERE token = :token")
# A delivery running at the same time as another one of the same message
# (possible after a lost consumer) finds the row taken: it must not fail.
_INSERT = text(
    f"INSERT INTO {TABLE} (token, task_id, expires_at) VALUES (:token, :task_id, :expires_at) "
    "ON CONFLICT (token) DO NOTHING"
)
_DELETE_EXPIRED = text(f"DELETE FROM {TABLE} WHERE expires_at < :now")
# Any constant: the advisory lock that serializes the table's creation.
_CREATE_LOCK_ID = 0x6267_636F_6D70_6C  # "bgcompl"

CLEANUP_INTERVAL = 3600.0


class CompletionLog:
    """The completion rows of one process: table creation and cleanup done once."""

    def __init__(self) -> None:
        # (pid, engine URL) for which the table is known to exist.
        self._ready: set[tuple[int, str]] = set()
        self._last_cleanup = 0.0

    async def completed(self, session: AsyncSession, token: str) -> bool:
        """Whether the run with this token already committed its work."""
        await self._ensure_table(session)
        return (await session.execute(_SELECT, {"token": token})).first() is not None

    async def record(self, session: AsyncSession, token: str, task_id: str, ttl: float) -> bool:
        """Add the completion row to the run's transaction (committed with its work).

        False if another delivery of the same message committed it meanwhile:
        the caller rolls back and reports the run as already completed.
        """
        now = time.time()
        if now - self._last_cleanup > CLEANUP_INTERVAL:
            self._last_cleanup = now
            await session.execute(_DELETE_EXPIRED, {"now": now})
        inserted = await session.execute(
            _INSERT, {"token": token, "task_id": task_id, "expires_at": now + ttl}
        )
        return bool(getattr(inserted, "rowcount", 1))

    async def _ensure_table(self, session: AsyncSession) -> None:
        bind = session.bind
        engine = bind if isinstance(bind, AsyncEngine) else getattr(bind, "engine", None)
        if not isinstance(engine, AsyncEngine):
            raise TypeError("a task session must be bound to an AsyncEngine or AsyncConnection")
        key = (os.getpid(), str(engine.url))
        if key not in self._ready:
            # Two runs of this process may both get here: creation is idempotent.
            await create_table(engine, _CREATE, _CREATE_LOCK_ID)
            self._ready.add(key)


completion_log = CompletionLog()
