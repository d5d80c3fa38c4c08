"""Run-once for ``@db_task`` runs dispatched with a ``task_id``: a redelivery is skipped.

Delivery is at least once: a pool process killed after its task committed
but before the message was acknowledged makes the broker deliver the message
again, and the task would run a second time. For a db task dispatched with a
custom ``task_id`` (deduplicated, so its message carries the lease token) the
framework writes a completion row keyed by that token *in the task's own
transaction*: the task's writes and the row commit together or not at all. A
redelivered message finds the row and is skipped, so its work is done once.

The row goes with the run's *first* commit (a ``before_commit`` listener on
the session, ``CompletionMarker``): the framework's commit after the body, or
an earlier ``await ctx.session.commit()`` of the body itself, so a
redelivery after an explicit commit is skipped too. ``ctx.commit_batch()``
does not write it: a batch is part of a bulk job, which stays incomplete (and
runs again from the start) until its body returns. If the body fails after
the row committed, the row is deleted again so that the retry runs the body.

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
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, Double, MetaData, String, Table, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from ..session import ensure_table

TABLE = "background_task_completions"

metadata = MetaData()
completions_table = Table(
    TABLE,
    metadata,
    Column("token", String(64), primary_key=True),
    Column("task_id", String(255), nullable=False),
    Column("expires_at", Double, nullable=False),
)
_SELECT = text(f"SELECT 1 FROM {TABLE} WHERE token = :token")
# A delivery running at the same time as another one of the same message
# (possible after a lost consumer) finds the row taken: it must not fail.
_INSERT = text(
    f"INSERT INTO {TABLE} (token, task_id, expires_at) VALUES (:token, :task_id, :expires_at) "
    "ON CONFLICT (token) DO NOTHING"
)
_DELETE_EXPIRED = text(f"DELETE FROM {TABLE} WHERE expires_at < :now")
_DELETE_TOKEN = text(f"DELETE FROM {TABLE} WHERE token = :token")
# Any constant: the advisory lock that serializes the table's creation.
_CREATE_LOCK_ID = 0x6267_636F_6D70_6C  # "bgcompl"; pragma: no mutate (any constant works)

# How often expired rows are deleted: tuning, not behaviour (a second more or less).
CLEANUP_INTERVAL = 3600.0  # pragma: no mutate


class CompletionLog:
    """The completion rows of one process: table creation and cleanup done once."""

    def __init__(self) -> None:
        # (pid, engine URL) for which the table is known to exist.
        self._ready: set[tuple[int, str]] = set()
        # Long before any ``now``: the first record cleans up (0 or +-1 s alike).
        self._last_cleanup = 0.0  # pragma: no mutate

    async def completed(self, session: AsyncSession, token: str) -> bool:
        """Whether the run with this token already committed its work."""
        await self._ensure_table(session)
        return (await session.execute(_SELECT, {"token": token})).first() is not None

    async def record(self, session: AsyncSession, token: str, task_id: str, ttl: float) -> bool:
        """Add the completion row to the run's transaction (committed with its work).

        False if another delivery of the same message committed it meanwhile:
        the caller rolls back and reports the run as already completed.
        """
        return await session.run_sync(self.record_sync, token, task_id, ttl)

    def record_sync(self, session: Session, token: str, task_id: str, ttl: float) -> bool:
        """``record`` on the sync session under an ``AsyncSession`` (a session event's)."""
        now = time.time()
        elapsed = now - self._last_cleanup
        # '>' or '>=' differ only when two float clock readings are exactly an interval apart.
        due = elapsed > CLEANUP_INTERVAL  # pragma: no mutate
        if due:
            self._last_cleanup = now
            session.execute(_DELETE_EXPIRED, {"now": now})
        inserted = session.execute(
            _INSERT, {"token": token, "task_id": task_id, "expires_at": now + ttl}
        )
        # A CursorResult always has rowcount: the default is never used.
        return bool(getattr(inserted, "rowcount", 1))  # pragma: no mutate

    async def forget(self, session: AsyncSession, token: str) -> None:
        """Delete the row of ``token`` and commit: the run did not complete after all."""
        await session.execute(_DELETE_TOKEN, {"token": token})
        await session.commit()

    async def _ensure_table(self, session: AsyncSession) -> None:
        bind = session.bind
        engine = bind if isinstance(bind, AsyncEngine) else getattr(bind, "engine", None)
        if not isinstance(engine, AsyncEngine):
            raise TypeError("a task session must be bound to an AsyncEngine or AsyncConnection")
        key = (os.getpid(), str(engine.url))
        if key not in self._ready:
            # Two runs of this process may both get here: creation is idempotent.
            await ensure_table(engine, completions_table, _CREATE_LOCK_ID)
            self._ready.add(key)


completion_log = CompletionLog()


class AlreadyCompleted(BaseException):
    """Another delivery of this message committed its completion row first.

    Raised from the commit that would have written the row, which is then
    not made. A ``BaseException``, so that a body's ``except Exception``
    around its own ``commit()`` does not swallow it.
    """


class CompletionMarker:
    """Writes a run's completion row with the first commit of its session.

    A ``before_commit`` listener on the ``AsyncSession``'s sync session adds
    the row to whichever commit comes first, the body's own or the
    framework's after the body; ``skip()`` true means "not this commit"
    (a batch of a bulk job). A commit that fails rolls the row back with it,
    and the next commit writes it again.
    """

    def __init__(
        self,
        session: AsyncSession,
        token: str,
        task_id: str,
        ttl: float,
        skip: Callable[[], bool] = lambda: False,
        log: CompletionLog = completion_log,
    ) -> None:
        self.token, self._task_id, self._ttl, self._skip, self._log = token, task_id, ttl, skip, log
        self._session = session.sync_session
        # The row is in the transaction being committed / in a committed one.
        self._pending = False
        self.committed = False
        # Another delivery's row was found: this run must not commit anything.
        self.duplicate = False
        self._listeners: list[tuple[str, Callable[..., Any]]] = [
            ("before_commit", self._before_commit),
            ("after_commit", self._after_commit),
            ("after_rollback", self._after_rollback),
        ]
        for name, listener in self._listeners:
            event.listen(self._session, name, listener)

    def detach(self) -> None:
        for name, listener in self._listeners:
            if event.contains(self._session, name, listener):
                event.remove(self._session, name, listener)

    def _before_commit(self, session: Session) -> None:
        if self.duplicate:
            raise AlreadyCompleted
        if self._pending or self.committed or self._skip():
            return
        self._pending = True
        if not self._log.record_sync(session, self.token, self._task_id, self._ttl):
            self.duplicate = True
            raise AlreadyCompleted

    def _after_commit(self, _session: Session) -> None:
        if self._pending:
            self.committed = True
            # Left True it would change nothing: committed skips every later
            # before_commit, and a rollback clears it anyway.
            self._pending = False  # pragma: no mutate

    def _after_rollback(self, _session: Session) -> None:
        self._pending = False
