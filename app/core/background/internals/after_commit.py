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
a bad call fails in the endpoint before anything is committed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from kombu.utils.json import dumps
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from .dedup import CLAIMED_OPTION
from .exceptions import TaskArgumentError

if TYPE_CHECKING:
    from .base import BaseTask

logger = logging.getLogger("app.core.background.dispatch")

_PENDING = "background_pending_dispatches"
_DUE = "background_due_dispatches"
_DEFERRED = "background_defer_sending"
_LISTENING = "background_listening"


@dataclass(frozen=True, slots=True)
class Dispatch:
    """One task to send: its arguments and Celery options, with its id chosen up front."""

    task: BaseTask[Any, Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    task_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    # The transaction (or savepoint) it was registered in; None before the first statement.
    transaction: SessionTransaction | None = None
    # True when the caller chose the id: then it is deduplicated like any custom id.
    custom_id: bool = False

    def send(self) -> None:
        options = dict(self.options)
        if not self.custom_id:
            # A fresh uuid of ours needs no deduplication lease (one Redis round trip less).
            options[CLAIMED_OPTION] = True
        self.task.apply_async(self.args, self.kwargs, task_id=self.task_id, **options)


def check_dispatch(
    task: BaseTask[Any, Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> str:
    """Check the arguments as ``apply_async`` would; the JSON the broker would carry."""
    task.check_arguments(args, kwargs)
    try:
        return dumps([list(args), dict(kwargs)])
    except TypeError as exc:
        raise TaskArgumentError(f"{task.name}: arguments must be JSON-serializable: {exc}") from exc


def enqueue_after_commit(
    session: AsyncSession | Session,
    task: BaseTask[Any, Any],
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> str:
    """Send ``task`` when ``session`` commits (never if it rolls back); the task id."""
    kwargs = dict(kwargs or {})
    check_dispatch(task, args, kwargs)
    sync_session = _listen(session)
    custom_id = options.pop("task_id", None)
    task_id = custom_id or str(uuid.uuid4())
    dispatch = Dispatch(
        task,
        tuple(args),
        kwargs,
        options,
        task_id,
        _current_transaction(sync_session),
        custom_id=custom_id is not None,
    )
    sync_session.info.setdefault(_PENDING, []).append(dispatch)
    return task_id


def pending_dispatches(session: AsyncSession | Session) -> list[Dispatch]:
    """The dispatches waiting for this session's commit (for tests and debugging)."""
    return list(_sync(session).info.get(_PENDING, ()))


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
        await anyio.to_thread.run_sync(send_all, due)


def send_all(dispatches: list[Dispatch]) -> None:
    """Send in order; a failed send is logged and the others still go out."""
    for dispatch in dispatches:
        try:
            dispatch.send()
        except Exception:
            logger.exception(
                "Dispatch after commit failed",
                extra={"task_name": dispatch.task.name, "task_id": dispatch.task_id},
            )


# -- session events --------------------------------------------------------


def _sync(session: AsyncSession | Session) -> Session:
    return session.sync_session if isinstance(session, AsyncSession) else session


def _listen(session: AsyncSession | Session) -> Session:
    sync_session = _sync(session)
    if not sync_session.info.get(_LISTENING):
        event.listen(sync_session, "after_commit", _after_commit)
        event.listen(sync_session, "after_soft_rollback", _after_soft_rollback)
        sync_session.info[_LISTENING] = True
    return sync_session


def _current_transaction(session: Session) -> SessionTransaction | None:
    return session.get_nested_transaction() or session.get_transaction()


def _after_commit(session: Session) -> None:
    due = session.info.pop(_PENDING, [])
    if not due:
        return
    if session.info.get(_DEFERRED):
        session.info.setdefault(_DUE, []).extend(due)
    else:
        send_all(due)


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

    async def close(self) -> None:
        # Dispatches made due by ``async with session.begin():`` (which commits
        # the transaction, not the session) go out here.
        await super().close()
        await send_due(self)
