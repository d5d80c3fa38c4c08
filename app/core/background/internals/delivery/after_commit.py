"""Dispatch after commit: send a task when a session's transaction commits, never on rollback.

The classic bug: an endpoint inserts a row and calls ``task.delay(row.id)``
before the commit; the worker looks for a row that is not there yet, or that
is rolled back later. Here a dispatch is *registered* on the session (kept in
``session.info``) and SQLAlchemy's session events decide its fate:

- ``after_commit`` (outermost transaction only): the registered dispatches are
  due, in the order they were registered;
- ``after_soft_rollback``: the dispatches registered inside the transaction or
  savepoint that rolled back are discarded.

Who sends the due dispatches, and on which thread:

- a ``TaskSession`` (what ``TaskSessionDep`` gives an endpoint) sends them from
  its ``await commit()``, in a worker thread, so that a broker round trip never
  blocks the event loop; its ``close()`` sends any left by ``async with
  session.begin():``;
- any other session sends them inside the commit, on the calling thread (fine
  in a worker process or a script; in an endpoint use a ``TaskSession``).

Arguments are checked (signature and JSON) when the dispatch is registered, so
a bad call fails in the endpoint before anything is committed. A task the
broker does not take after the commit goes to the outbox, or is reported lost
(``keep_unsent``).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread
from sqlalchemy import Connection, event, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from ..exceptions import TaskDispatchError
from ..monitoring import record_dispatch_failure
from ..trace_context import active as tracing_active
from .dedup import deduplicator
from .outbox import outbox_row, outbox_table
from .publish import Message, checked_message, publish

if TYPE_CHECKING:
    from ..base import BaseTask

logger = logging.getLogger("app.core.background.dispatch")

T = TypeVar("T")

_PENDING = "background_pending_dispatches"
_DUE = "background_due_dispatches"
_DEFERRED = "background_defer_sending"
_LISTENING = "background_listening"


# Nothing changes these (frozen, slotted or not, the same): pragma: no mutate
@dataclass(frozen=True, slots=True)  # pragma: no mutate
class Dispatch:
    """One message to send after a commit, with its id chosen up front."""

    message: Message
    # The transaction (or savepoint) it was registered in; None before the first statement.
    transaction: SessionTransaction | None
    # True when the caller chose the id: then it is deduplicated like any custom id.
    deduplicated: bool
    # Tracing on: the context of the call (its span), where the send runs after the
    # commit, so that the task's trace continues the caller's (None: tracing off).
    context: contextvars.Context | None = None

    def within_call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in the context of the call that registered this dispatch."""
        if self.context is None:
            return function(*args)
        return self.context.run(function, *args)

    @property
    def task_id(self) -> str:
        return self.message.task_id

    @property
    def kwargs(self) -> Mapping[str, Any]:
        return self.message.kwargs

    def send(self) -> None:
        task = self.message.task
        assert not isinstance(task, str)
        if self.deduplicated:
            deduplicator.send(task.app, self.message)
        else:
            # A fresh uuid of ours needs no lease (one Redis round trip less).
            publish(task.app, self.message)


def enqueue_after_commit(
    session: AsyncSession | Session,
    task: BaseTask[Any, Any],
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> str:
    """Send ``task`` when ``session`` commits (never if it rolls back); the task id."""
    message = checked_message(task, args, kwargs, options)
    sync_session = _listen(session)
    deduplicated = options.get("task_id") is not None
    context = contextvars.copy_context() if tracing_active() else None
    dispatch = Dispatch(message, _current_transaction(sync_session), deduplicated, context)
    sync_session.info.setdefault(_PENDING, []).append(dispatch)
    return message.task_id


def pending_dispatches(session: AsyncSession | Session) -> list[Dispatch]:
    """The dispatches waiting for this session's commit (for tests and debugging)."""
    return list(_sync(session).info.get(_PENDING, ()))


def discard_pending(session: AsyncSession | Session) -> None:
    """Drop every dispatch waiting for a commit (the session rolled back)."""
    _sync(session).info.pop(_PENDING, None)


def defer_sending(session: AsyncSession) -> None:
    """Let the caller send due dispatches (``send_due``) instead of the commit itself."""
    _listen(session).info[_DEFERRED] = True


def take_due(session: AsyncSession | Session) -> list[Dispatch]:
    """The dispatches whose transaction committed, removed from the session."""
    return list(_sync(session).info.pop(_DUE, ()))


async def send_due(session: AsyncSession) -> None:
    """Send, in a worker thread, what the last commit made due."""
    due = take_due(session)
    if due:
        failed = await anyio.to_thread.run_sync(send_all, due)
        if failed:
            await session.run_sync(keep_unsent, failed)


def send_all(dispatches: list[Dispatch]) -> list[Unsent]:
    """Send in order; the ones the broker did not take (the others still go out)."""
    failed = []
    for dispatch in dispatches:
        try:
            dispatch.within_call(dispatch.send)
        except Exception as exc:  # noqa: BLE001 - every one is kept or reported: keep_unsent
            failed.append(Unsent(dispatch, exc))
    return failed


# -- when the broker does not take them --------------------------------------
#
# The change is committed, so its task must not vanish. By default the task
# becomes an outbox row (written in a transaction of its own, on the session's
# database), which the relay sends once the broker is back: the change keeps
# its task, and the caller carries on. If that fails too, or the fallback is
# "error", the task is reported lost (an ERROR line with its id, name and the
# keys of its arguments, and a metric) and TaskDispatchError is raised from
# the commit: the change is committed, the caller must not say all is well.


# Nothing changes these (frozen, slotted or not, the same): pragma: no mutate
@dataclass(frozen=True, slots=True)  # pragma: no mutate
class Unsent:
    dispatch: Dispatch
    error: Exception


def keep_unsent(session: Session, failed: list[Unsent]) -> None:
    """Write ``failed`` to the outbox, or report them lost and raise ``TaskDispatchError``."""
    # A task object; all of a session's share one Celery app: [0] or [-1] alike. pragma: no mutate
    app = failed[0].dispatch.message.task.app  # type: ignore[union-attr]  # pragma: no mutate
    reason: Exception | None = None
    if app.conf.get("background_after_commit_fallback", "outbox") == "outbox":
        try:
            _write_to_outbox(session, failed)
        except Exception as exc:  # noqa: BLE001 - reported below, with the send's own error
            reason = exc
        else:
            for unsent in failed:
                _report(unsent, logging.WARNING, "deferred", "Dispatch after commit failed: "
                        "the task is in the outbox, the relay sends it")  # fmt: skip
            return
    for unsent in failed:
        _report(unsent, logging.ERROR, "lost", "Task lost: dispatch after commit failed",
                outbox_error=None if reason is None else repr(reason))  # fmt: skip
    first = failed[0].dispatch.message
    raise TaskDispatchError(
        f"{len(failed)} task(s) registered with delay_on_commit were not sent after the commit "
        f"(first: {first.task_name} [{first.task_id}]: {failed[0].error})"
        + ("" if reason is None else f"; writing them to the outbox failed too: {reason!r}"),
        task_name=first.task_name,
        task_ids=tuple(unsent.dispatch.message.task_id for unsent in failed),
    )


def _write_to_outbox(session: Session, failed: list[Unsent]) -> None:
    # Each row keeps the trace of the call that registered it, as the send would have.
    rows = [unsent.dispatch.within_call(outbox_row, unsent.dispatch.message) for unsent in failed]
    bind = session.get_bind()
    if isinstance(bind, Connection):
        # A session bound to one connection (a test's outer transaction): stay in it.
        with bind.begin_nested() if bind.in_transaction() else bind.begin():
            bind.execute(insert(outbox_table), rows)
    else:
        with bind.begin() as connection:
            connection.execute(insert(outbox_table), rows)


def _report(unsent: Unsent, level: int, outcome: str, line: str, **more: Any) -> None:
    message = unsent.dispatch.message
    record_dispatch_failure(message.task_name, message.queue, outcome)
    logger.log(
        level,
        line,
        extra={
            "fields": {
                "task_id": message.task_id,
                "task_name": message.task_name,
                "queue": message.queue,
                "outcome": outcome,
                # The keys only: argument values stay out of logs (README).
                "argument_keys": sorted(message.kwargs),
                "positional_arguments": len(message.args),
                "error": repr(unsent.error),
                **{key: value for key, value in more.items() if value is not None},
            }
        },
    )


# -- session events --------------------------------------------------------


def _sync(session: AsyncSession | Session) -> Session:
    return session.sync_session if isinstance(session, AsyncSession) else session


def _listen(session: AsyncSession | Session) -> Session:
    sync_session = _sync(session)
    if not sync_session.info.get(_LISTENING):
        event.listen(sync_session, "after_commit", _after_commit)
        event.listen(sync_session, "after_soft_rollback", _after_soft_rollback)
        # Listening twice adds nothing (SQLAlchemy keeps one of a listener): pragma: no mutate
        sync_session.info[_LISTENING] = True  # pragma: no mutate
    return sync_session


def _current_transaction(session: Session) -> SessionTransaction | None:
    return session.get_nested_transaction() or session.get_transaction()


def _after_commit(session: Session) -> None:
    due = session.info.pop(_PENDING, [])
    if not due:
        return
    if session.info.get(_DEFERRED):
        session.info.setdefault(_DUE, []).extend(due)
    elif failed := send_all(due):
        keep_unsent(session, failed)


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    pending: list[Dispatch] = session.info.get(_PENDING, [])
    if pending:
        session.info[_PENDING] = [
            d for d in pending if not _inside(d.transaction, previous_transaction)
        ]


def _inside(transaction: SessionTransaction | None, ended: SessionTransaction) -> bool:
    """Whether a dispatch registered in ``transaction`` belongs to ``ended``."""
    if transaction is None:
        # Registered before the session began: it belongs to the outermost transaction.
        return ended.parent is None
    current: SessionTransaction | None = transaction
    while current is not None:
        if current is ended:
            return True
        current = current.parent
    return False


class TaskSession(AsyncSession):
    """An ``AsyncSession`` whose ``commit()`` then sends its tasks, in a worker thread.

    Use it as the ``class_`` of an ``async_sessionmaker`` (``TaskSessionDep`` does).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        defer_sending(self)

    async def commit(self) -> None:
        await super().commit()
        await send_due(self)

    async def rollback(self) -> None:
        await super().rollback()
        # Dispatches registered before the session's first statement belong to
        # no transaction yet, and SQLAlchemy has none to roll back (no event
        # fires): they go too, or the next commit would send them.
        discard_pending(self)

    async def close(self) -> None:
        # Dispatches made due by ``async with session.begin():`` (which commits
        # the transaction, not the session) go out here.
        await super().close()
        await send_due(self)
