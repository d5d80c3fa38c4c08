"""Dead letters: every task that failed for good, kept in the application's database.

One row per failed task id (``background_dead_letters``): what ran (name,
queue, the arguments as JSON, as sent), how it failed (reason, error type,
module, message, traceback), how often and where (attempts, worker, first and
last failure time), and whether it was sent again (``replayed_as``, the new
task's id). The rows live next to the application's own tables, on the
embedded SQLite default and on PostgreSQL alike, so an operator reads and
replays them with the tools of this module (the CLI, the operations router)
after the result backend has long expired the failure.

Who can read the arguments: whoever can read this table, and whoever the
application lets into the operations router. They are stored even when
``BACKGROUND_LOG_TASK_ARGUMENTS`` keeps them out of the logs, because a
replay needs them.

Writes are their own short transactions, never the failed task's (which has
rolled back). The table comes from the migrations, or is created on first use
like the framework's other tables (``session.ensure_table``: an advisory lock
on PostgreSQL).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kombu.utils import json as kombu_json
from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..session import ensure_table

TABLE = "background_dead_letters"

# Why a task is a dead letter (the ``reason`` column).
Reason = Literal[
    "non-retriable",
    "retries exhausted",
    "worker lost",
    "time limit",
    "refused",
]

# Arguments longer than this (JSON characters) are kept cut, and the row
# cannot be replayed: a replay must send exactly what was sent.
MAX_ARGUMENTS_CHARS = 1_000_000
# Error messages and tracebacks longer than this are cut (they are for reading).
MAX_TEXT_CHARS = 100_000
# The Celery setting (BACKGROUND_DEAD_LETTER_RETENTION_DAYS, in seconds) and its default.
RETENTION_SETTING = "background_dead_letter_retention"
DEFAULT_RETENTION = 30 * 86400.0
# Rows per page, and the most a caller may ask for.
PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

metadata = MetaData()

dead_letters = Table(
    TABLE,
    metadata,
    Column("task_id", String(255), primary_key=True),
    Column("task_name", String(255), nullable=False),
    Column("queue", String(255)),
    Column("reason", String(32), nullable=False),
    # {"args": [...], "kwargs": {...}} as JSON; ``arguments_complete`` false when cut
    # or when the message could not be decoded (a refused message's raw body).
    Column("arguments", Text, nullable=False),
    Column("arguments_complete", Boolean, nullable=False),
    Column("error_type", String(255), nullable=False),
    Column("error_module", String(255)),
    Column("error_message", Text, nullable=False),
    Column("traceback", Text),
    Column("attempts", Integer, nullable=False),
    Column("worker", String(255)),
    # Seconds since the epoch (UTC), as the framework's other tables keep time.
    Column("first_failed_at", Float, nullable=False),
    Column("last_failed_at", Float, nullable=False),
    Column("replayed_as", String(255)),
    Column("replayed_at", Float),
    # Newest first; and the groups (task and error) counted from the index
    # alone (it holds every column the grouping reads: no table lookups).
    Index(f"{TABLE}_last_failed", "last_failed_at"),
    Index(f"{TABLE}_group", "task_name", "error_type", "last_failed_at", "replayed_as"),
)

# Any constant: the advisory lock that serializes the table's creation.
_CREATE_LOCK_ID = 0x6267_6465_6164  # "bgdead"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One task that failed for good."""

    task_id: str
    task_name: str
    queue: str | None
    reason: str
    arguments: str
    arguments_complete: bool
    error_type: str
    error_module: str | None
    error_message: str
    traceback: str | None
    attempts: int
    worker: str | None
    first_failed_at: float
    last_failed_at: float
    replayed_as: str | None = None
    replayed_at: float | None = None

    def call(self) -> tuple[list[Any], dict[str, Any]]:
        """The positional and keyword arguments it was sent with (complete rows only)."""
        decoded = kombu_json.loads(self.arguments)
        return list(decoded.get("args") or []), dict(decoded.get("kwargs") or {})

    def trace(self) -> dict[str, str]:
        """The W3C headers of the run that failed (tracing on when it failed), else {}."""
        try:
            decoded = kombu_json.loads(self.arguments)
        except ValueError:
            return {}
        trace = decoded.get("trace") if isinstance(decoded, dict) else None
        return {str(k): str(v) for k, v in trace.items()} if isinstance(trace, dict) else {}

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class DeadLetterGroup:
    """The dead letters of one task name and error type."""

    task_name: str
    error_type: str
    count: int
    not_replayed: int
    last_failed_at: float


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters: any combination; None matches everything."""

    task_name: str | None = None
    error_type: str | None = None
    since: float | None = None
    until: float | None = None
    # True: only those not replayed yet; False: only replayed ones.
    pending: bool | None = None

    def conditions(self) -> list[Any]:
        c = dead_letters.c
        found: list[Any] = []
        if self.task_name is not None:
            found.append(c.task_name == self.task_name)
        if self.error_type is not None:
            found.append(c.error_type == self.error_type)
        if self.since is not None:
            found.append(c.last_failed_at >= self.since)
        if self.until is not None:
            found.append(c.last_failed_at < self.until)
        if self.pending is True:
            found.append(c.replayed_as.is_(None))
        elif self.pending is False:
            found.append(c.replayed_as.is_not(None))
        return found


def encode_arguments(
    args: Sequence[Any] | None,
    kwargs: dict[str, Any] | None,
    trace: dict[str, str] | None = None,
) -> tuple[str, bool]:
    """The arguments as stored: JSON (ASCII, so any text is safe), cut when huge.

    ``trace``: the W3C headers of the failed run (tracing on), kept beside the
    arguments (``"trace"``) so that a replay's span can link to it.

    kombu's JSON, as on the wire: a datetime, Decimal or UUID the task was
    sent with is stored with its type and comes back as one in a replay. A
    value no JSON can hold is stored as its ``repr`` and the row marked
    incomplete (not replayable as is).
    """
    call: dict[str, Any] = {"args": list(args or ()), "kwargs": dict(kwargs or {})}
    if trace:
        call["trace"] = trace
    complete = True
    try:
        encoded = kombu_json.dumps(call, ensure_ascii=True)
    except (TypeError, ValueError):
        encoded, complete = json.dumps(call, ensure_ascii=True, default=repr), False
    if len(encoded) > MAX_ARGUMENTS_CHARS:
        return encoded[:MAX_ARGUMENTS_CHARS], False
    return encoded, complete


def cut(text: str | None, limit: int = MAX_TEXT_CHARS) -> str | None:
    """``text`` at most ``limit`` characters long, saying so when cut."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}\n... ({len(text) - limit} more characters not kept)"


class DeadLetterStore:
    """The dead letters table on one engine (the worker's, the API's or the CLI's)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._ready_pid: int | None = None

    async def ensure_table(self) -> None:
        """Create the table and its indexes unless they exist (once per process).

        With run-time creation off (``session.table_creation``), check instead
        that the migrations made it.
        """
        if self._ready_pid != os.getpid():
            await ensure_table(self.engine, dead_letters, _CREATE_LOCK_ID)
            self._ready_pid = os.getpid()

    async def record(self, letter: DeadLetter) -> None:
        """Add ``letter``; the same task id failing again updates its row.

        The row keeps its first failure time; the rest is the latest
        failure's. A replay mark is cleared: the id failing again (a
        deduplication key sent again by the application) is a failure to see
        and replay, not one already dealt with.
        """
        await self.ensure_table()
        values = letter.as_dict()
        values["replayed_as"] = values["replayed_at"] = None
        async with self.engine.begin() as connection:
            insert = (postgresql if connection.dialect.name == "postgresql" else sqlite).insert
            statement = insert(dead_letters).values(**values)
            latest = {
                name: statement.excluded[name]
                for name in values
                if name not in ("task_id", "first_failed_at")
            }
            await connection.execute(
                statement.on_conflict_do_update(index_elements=["task_id"], set_=latest)
            )

    async def get(self, task_id: str) -> DeadLetter | None:
        await self.ensure_table()
        async with self.engine.connect() as connection:
            row = (
                await connection.execute(
                    select(dead_letters).where(dead_letters.c.task_id == task_id)
                )
            ).first()
        return None if row is None else DeadLetter(**row._asdict())

    async def page(
        self,
        where: DeadLetterFilter = DeadLetterFilter(),
        *,
        offset: int = 0,
        limit: int = PAGE_SIZE,
    ) -> tuple[list[DeadLetter], int]:
        """One page of dead letters, newest first, and how many match in all."""
        await self.ensure_table()
        limit = max(1, min(limit, MAX_PAGE_SIZE))
        conditions = where.conditions()
        query = (
            select(dead_letters)
            .where(*conditions)
            .order_by(dead_letters.c.last_failed_at.desc(), dead_letters.c.task_id)
            .offset(max(offset, 0))
            .limit(limit)
        )
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
            total = (
                await connection.execute(
                    select(func.count()).select_from(dead_letters).where(*conditions)
                )
            ).scalar_one()
        return [DeadLetter(**row._asdict()) for row in rows], int(total)

    async def groups(self, where: DeadLetterFilter = DeadLetterFilter()) -> list[DeadLetterGroup]:
        """Dead letters counted by task name and error type, the most recent group first."""
        await self.ensure_table()
        c = dead_letters.c
        newest = func.max(c.last_failed_at)
        query = (
            select(
                c.task_name,
                c.error_type,
                func.count().label("count"),
                func.count().filter(c.replayed_as.is_(None)).label("not_replayed"),
                newest.label("last_failed_at"),
            )
            .where(*where.conditions())
            .group_by(c.task_name, c.error_type)
            .order_by(newest.desc())
        )
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [DeadLetterGroup(**row._asdict()) for row in rows]

    async def task_ids(self, where: DeadLetterFilter, limit: int = 10_000) -> list[str]:
        """The ids of the matching dead letters, oldest first (a replay's order)."""
        await self.ensure_table()
        query = (
            select(dead_letters.c.task_id)
            .where(*where.conditions())
            .order_by(dead_letters.c.last_failed_at, dead_letters.c.task_id)
            .limit(limit)
        )
        async with self.engine.connect() as connection:
            return list((await connection.execute(query)).scalars())

    async def purge(self, where: DeadLetterFilter, task_id: str | None = None) -> int:
        """Delete the matching rows (or the one of ``task_id``); how many went."""
        await self.ensure_table()
        conditions = where.conditions()
        if task_id is not None:
            conditions.append(dead_letters.c.task_id == task_id)
        async with self.engine.begin() as connection:
            result = await connection.execute(delete(dead_letters).where(*conditions))
        return int(getattr(result, "rowcount", 0) or 0)

    async def prune(self, older_than_seconds: float, now: float | None = None) -> int:
        """Delete the rows whose last failure is older than the retention."""
        until = (time.time() if now is None else now) - older_than_seconds
        return await self.purge(DeadLetterFilter(until=until))

    async def mark_replayed(
        self, connection: AsyncConnection, task_id: str, replayed_as: str, now: float
    ) -> bool:
        """Claim the row for a replay in ``connection``'s transaction; False if already replayed.

        The UPDATE locks the row (PostgreSQL) or the database (SQLite) until
        the transaction ends: a second replay of the same row waits, then
        finds it replayed.
        """
        c = dead_letters.c
        result = await connection.execute(
            update(dead_letters)
            .where(c.task_id == task_id, c.replayed_as.is_(None))
            .values(replayed_as=replayed_as, replayed_at=now)
        )
        return bool(getattr(result, "rowcount", 0))
