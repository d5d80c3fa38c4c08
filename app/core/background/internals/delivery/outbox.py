"""Transactional outbox: the task is a row written in the caller's transaction.

``task.delay_via_outbox(session, ...)`` adds an ``OutboxMessage`` to the
session; it is committed (or rolled back) with the caller's own rows, so a
committed change can never lose its task, even if the process dies right
after the commit. A relay (``python -m app.core.background relay``) then sends
pending rows, each with the task id chosen when the row was written, and marks
them sent.

Delivery is at least once: a relay that dies between the send and its own
commit sends the row again, with the same task id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.to_thread
from celery import Celery
from kombu.utils.json import dumps, loads
from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .. import trace_context
from ..session import DatabaseConfig, create_engine
from .publish import Message, checked_message, publish

if TYPE_CHECKING:
    from ..base import BaseTask

logger = logging.getLogger("app.core.background.outbox")


class OutboxBase(DeclarativeBase):
    """The outbox's own base (``schema.include_framework_tables`` copies its table onto yours)."""


class OutboxMessage(OutboxBase):
    """One task waiting to be sent by the relay."""

    __tablename__ = "background_outbox"
    __table_args__ = (Index("ix_background_outbox_unsent", "sent_at", "id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    # Column sizes, the index, the default batch sizes and intervals below are
    # tuning, not behaviour (marked "no mutate" for scripts/mutation.sh).
    # Not unique: a custom id (``update-{entity_id}``) is reused once its task has
    # run; sent rows stay. Long enough for ``args_key`` ids.
    task_id: Mapped[str] = mapped_column(String(255), index=True)  # pragma: no mutate
    task_name: Mapped[str] = mapped_column(String(200))  # pragma: no mutate
    # JSON (kombu's encoder, as the broker message would carry it): [args, kwargs, options].
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=lambda: datetime.now(UTC)
    )
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


outbox_table = cast(Table, OutboxMessage.__table__)


def enqueue_via_outbox(
    session: AsyncSession | Session,
    task: BaseTask[Any, Any],
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> str:
    """Add ``task`` to the outbox in ``session``'s transaction; the task id."""
    message = checked_message(task, args, kwargs, options)
    session.add(OutboxMessage(**outbox_row(message)))
    return message.task_id


def outbox_row(message: Message) -> dict[str, str]:
    """The outbox columns of one message (arguments already checked)."""
    # The relay may not import the task's module: keep the queue it routes to.
    options = {**message.options, "queue": message.queue}
    if trace := trace_context.current():
        # Tracing on: the span that wrote the row, in the message headers it will
        # have; the relay sends it inside that context (see ``_publish``).
        options["headers"] = {**(options.get("headers") or {}), **trace}
    try:
        payload = dumps([list(message.args), dict(message.kwargs), options])
    except TypeError as exc:
        raise ValueError(f"{message.task_name}: options must be JSON-serializable: {exc}") from exc
    return {"task_id": message.task_id, "task_name": message.task_name, "payload": payload}


SessionFactory = Callable[[], AsyncSession]


async def relay_outbox(
    sessions: SessionFactory,
    app: Celery,
    batch_size: int = 100,  # pragma: no mutate
) -> int:
    """Send up to ``batch_size`` pending rows in order and mark them sent; how many were sent.

    A row the broker did not take stays pending (see ``_relay_pass``).
    """
    sent, _failure = await _relay_pass(sessions, app, batch_size)
    return sent


async def _relay_pass(
    sessions: SessionFactory, app: Celery, batch_size: int
) -> tuple[int, Exception | None]:
    """One pass: how many rows were sent, and why the first unsent one was not.

    Rows are locked with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL), so several
    relays can run at once; SQLite has no row locks and serialises writers.
    A row whose send fails keeps its place (attempts and last error recorded)
    and stops the batch, so that later rows do not overtake it.
    """
    table = outbox_table
    async with sessions() as session, session.begin():
        rows = (
            await session.execute(
                select(table.c.id, table.c.task_id, table.c.task_name, table.c.payload)
                .where(table.c.sent_at.is_(None))
                .order_by(table.c.id)
                .limit(batch_size)
                .with_for_update(skip_locked=True)
            )
        ).all()
        if not rows:
            return 0, None
        sent, failure = await anyio.to_thread.run_sync(_publish, app, rows)
        if sent:
            await session.execute(
                update(table).where(table.c.id.in_(sent)).values(sent_at=datetime.now(UTC))
            )
        if failure is not None:
            row_id, error = failure
            last_error = f"{type(error).__name__}: {error}"
            await session.execute(
                update(table)
                .where(table.c.id == row_id)
                .values(attempts=table.c.attempts + 1, last_error=last_error)
            )
    return len(sent), None if failure is None else failure[1]


def _publish(app: Celery, rows: Sequence[Any]) -> tuple[list[int], tuple[int, Exception] | None]:
    sent: list[int] = []
    for row in rows:
        args, kwargs, options = loads(row.payload)
        # By name: the relay need not import every task module. (A custom id
        # is therefore not deduplicated here, unlike .delay(); the writer's
        # transaction decides whether the task exists at all.)
        message = Message(row.task_name, tuple(args), kwargs, row.task_id, options)
        try:
            # The trace of the call that wrote the row goes on from there (tracing on).
            with trace_context.restored(trace_context.trace_headers(options.get("headers"))):
                publish(app, message)
        except Exception as exc:  # noqa: BLE001 - kept in the row and retried by the next pass
            logger.warning(
                "Outbox send failed",
                extra={"fields": {"task_id": row.task_id, "task_name": row.task_name,
                                  "queue": message.queue, "error": repr(exc)}},
            )  # fmt: skip
            return sent, (row.id, exc)
        sent.append(row.id)
    return sent, None


async def run_relay(
    sessions: SessionFactory,
    app: Celery,
    # Callers name the options: '*' or '/' here are the same. pragma: no mutate
    *,  # pragma: no mutate
    interval: float = 1.0,  # pragma: no mutate
    batch_size: int = 100,  # pragma: no mutate
    once: bool = False,
    stop: anyio.Event | None = None,
    on_turn: Callable[[], object] | None = None,
) -> int:
    """Relay until cancelled or ``stop`` is set (or one drain with ``once``); rows sent.

    With ``once``, a row the broker did not take raises its error after the
    rows before it are marked sent (``relay --once`` exits non-zero); without,
    the row is tried again on the next pass. ``stop`` ends the loop between
    passes (a pass in progress finishes: its sent rows are marked sent, none
    is sent twice). ``on_turn`` is called before every pass (a heartbeat:
    the loop turns).
    """
    total = 0
    while stop is None or not stop.is_set():
        if on_turn is not None:
            on_turn()
        try:
            sent, failure = await _relay_pass(sessions, app, batch_size)
        except Exception as exc:  # a database blip must not stop the relay
            if once:
                raise
            logger.warning("Outbox relay pass failed", extra={"fields": {"error": repr(exc)}})
            await _pause(interval, stop)
            continue
        total += sent
        if sent:
            logger.info("Outbox relayed", extra={"fields": {"sent": sent}})
        if failure is not None and once:
            raise failure
        if sent == batch_size:
            continue
        if once:
            return total
        await _pause(interval, stop)
    return total


async def _pause(seconds: float, stop: anyio.Event | None) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    if stop is None:
        await anyio.sleep(seconds)
        return
    with anyio.move_on_after(seconds):
        await stop.wait()


async def serve_relay(
    database_url: str,
    app: Celery,
    # The CLI names the options: '*' or '/' here are the same. pragma: no mutate
    *,  # pragma: no mutate
    interval: float,
    batch_size: int,
    once: bool,
    stop: anyio.Event | None = None,
    on_turn: Callable[[], object] | None = None,
) -> int:
    """``run_relay`` on an engine of its own, disposed at the end (the CLI's entry point)."""
    # One relay pass holds one connection; a second covers a pass started while
    # the previous one returns its own (sizing, not behaviour): pragma: no mutate
    engine = create_engine(DatabaseConfig(url=database_url, pool_size=2))  # pragma: no mutate
    try:
        sessions = async_sessionmaker(engine, expire_on_commit=False)  # pragma: no mutate
        return await run_relay(
            sessions,
            app,
            interval=interval,
            batch_size=batch_size,
            once=once,
            stop=stop,
            on_turn=on_turn,
        )
    finally:
        await engine.dispose()
