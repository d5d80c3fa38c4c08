"""Test helpers for users of the framework: run a task body with no broker or worker.

``TaskTestContext`` records what a task logs and returns and asserts on it;
``mock_task_session`` stands in for an ``AsyncSession`` and records commits
and rollbacks. ``my_task(ctx, ...)`` with one of these contexts runs the body
in the test's own process: the value for a sync task, a coroutine to await for
an async or db task, with the db task's commit-on-success and
rollback-on-error exactly as on a worker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from unittest.mock import AsyncMock, MagicMock

from sqlalchemy.ext.asyncio import AsyncSession

from .base import DatabaseTask
from .context import TaskContext
from .logging import SUCCESS, TaskLogger

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "success": SUCCESS,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_NAMES = {number: name for name, number in LEVELS.items()}

DEFAULT_TASK_ID = "test-task-id"
DEFAULT_TASK_NAME = "test.task"

_MISSING = object()


@dataclass(frozen=True, slots=True)
class LoggedRecord:
    """One ``ctx.log_*`` call: its level name, message and fields."""

    level: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = " ".join(f"{key}={value!r}" for key, value in self.fields.items())
        return f"{self.level.upper():7} {self.message} {extra}".rstrip()


class RecordingTaskLogger(TaskLogger):
    """A TaskLogger that keeps every record, and still logs it as on a worker."""

    __slots__ = ("records",)

    def __init__(self, fields: Mapping[str, Any]) -> None:
        super().__init__(fields)
        self.records: list[LoggedRecord] = []

    def log(self, level: int, message: str, exc_info: bool = False, **fields: Any) -> None:
        name = _NAMES.get(level, logging.getLevelName(level).lower())
        self.records.append(LoggedRecord(name, message, dict(fields)))
        self._emit(level, message, exc_info, fields)


class TaskTestContext(TaskContext):
    """A ``TaskContext`` for tests: records logs and results, and asserts on them.

    Every argument has a default. ``task_name`` and ``queue`` default to the
    task's own when the context is passed to a task. ``session`` defaults to a
    fresh ``mock_task_session()`` when a ``@db_task`` runs (read it back as
    ``ctx.session``); a ``@simple_task`` gets no session, as on a worker.
    """

    def __init__(
        self,
        task_id: str = DEFAULT_TASK_ID,
        session: AsyncSession | MockTaskSession | None = None,
        task_name: str | None = None,
        attempt: int = 0,
        queue: str | None = None,
    ) -> None:
        self._given_name = task_name
        self._given_queue = queue
        name = task_name or DEFAULT_TASK_NAME
        queue = queue or "default"
        self.recorder = RecordingTaskLogger(
            {"task_id": task_id, "task_name": name, "queue": queue, "attempt": attempt}
        )
        super().__init__(
            task_id=task_id,
            task_name=name,
            attempt=attempt,
            queue=queue,
            session=cast("AsyncSession | None", session),
            logger=self.recorder,
            publish_progress=self._record_progress,
        )
        self.results: list[dict[str, Any]] = []
        self.progress: list[dict[str, Any]] = []
        # Publish every update: a test should not depend on the clock.
        self.progress_interval = 0.0

    def run_directly(self, task: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if self._given_name is None:
            self.task_name = task.name
            self.recorder.bind(task_name=task.name)
        if self._given_queue is None:
            self.queue = task.background_queue
            self.recorder.bind(queue=task.background_queue)
        if isinstance(task, DatabaseTask) and not self.has_session:
            self._session = cast(AsyncSession, mock_task_session())
        return super().run_directly(task, args, kwargs)

    def _record_progress(self, metrics: Mapping[str, Any]) -> None:
        self.progress.append(dict(metrics))

    # -- what was recorded --------------------------------------------------

    @property
    def records(self) -> list[LoggedRecord]:
        """Every ``ctx.log_*`` call so far, in order."""
        return list(self.recorder.records)

    def logged(self, level: str | None = None) -> list[LoggedRecord]:
        """The records of one level (``"info"``, ``"success"``...), or all of them."""
        if level is None:
            return self.records
        wanted = _check_level(level)
        return [record for record in self.recorder.records if record.level == wanted]

    @property
    def messages(self) -> list[str]:
        """Just the messages of every record, in order."""
        return [record.message for record in self.recorder.records]

    def success_result(self, **fields: Any) -> dict[str, Any]:
        result = super().success_result(**fields)
        self.results.append(result)
        return result

    @property
    def result(self) -> dict[str, Any]:
        """The last ``ctx.success_result(...)`` the task built."""
        if not self.results:
            raise AssertionError(f"the task built no success_result; {self.log_text()}")
        return self.results[-1]

    def log_text(self) -> str:
        """What was logged, one record a line, for assertion messages."""
        lines = "\n".join(f"  {record}" for record in self.recorder.records)
        return "logged:\n" + (lines or "  (nothing)")

    # -- assertions ---------------------------------------------------------

    def assert_logged(self, level: str, contains: str | None = None, **fields: Any) -> LoggedRecord:
        """The first ``level`` record whose message contains ``contains`` and has ``fields``."""
        for record in self.logged(level):
            if contains is not None and contains not in record.message:
                continue
            if all(record.fields.get(key, _MISSING) == value for key, value in fields.items()):
                return record
        wanted = f"a {level.lower()!r} record"
        if contains is not None:
            wanted += f" containing {contains!r}"
        if fields:
            wanted += f" with {fields!r}"
        raise AssertionError(f"expected {wanted}; {self.log_text()}")

    def assert_logged_success(self, contains: str | None = None, **fields: Any) -> LoggedRecord:
        """A ``ctx.log_success(...)`` record (optionally with that text and those fields)."""
        return self.assert_logged("success", contains, **fields)

    def assert_not_logged(self, level: str, contains: str | None = None) -> None:
        """No ``level`` record (whose message contains ``contains``, if given)."""
        found = [
            record
            for record in self.logged(level)
            if contains is None or contains in record.message
        ]
        if found:
            what = f"no {level.lower()!r} record" + (
                f" containing {contains!r}" if contains is not None else ""
            )
            raise AssertionError(f"expected {what}, found {len(found)}; {self.log_text()}")

    def assert_no_errors(self) -> None:
        """Nothing was logged at ``error`` level."""
        self.assert_not_logged("error")


def _check_level(level: str) -> str:
    name = level.lower()
    if name not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; one of: {', '.join(LEVELS)}")
    return name


# AsyncSession's coroutine methods; the others (add, expunge, begin...) are sync.
_AWAITABLE_METHODS = (
    "execute",
    "scalar",
    "scalars",
    "get",
    "get_one",
    "merge",
    "delete",
    "flush",
    "commit",
    "rollback",
    "refresh",
    "close",
    "stream",
    "stream_scalars",
    "run_sync",
    "connection",
    "invalidate",
    "reset",
)


def empty_result() -> MagicMock:
    """What ``await session.execute(...)`` returns by default: a result with no rows."""
    result = MagicMock(name="result")
    for name in ("all", "fetchall"):
        getattr(result, name).return_value = []
    for name in ("first", "one_or_none", "scalar", "scalar_one_or_none", "fetchone"):
        getattr(result, name).return_value = None
    result.scalars.return_value = result
    result.unique.return_value = result
    result.__iter__.return_value = iter(())
    return result


class MockTaskSession(MagicMock):
    """Stands in for ``AsyncSession``: awaitable methods, recorded commits and rollbacks.

    ``isinstance(session, AsyncSession)`` is true; an attribute that
    ``AsyncSession`` does not have raises ``AttributeError``. Every method is a
    mock, so a test can set ``session.execute.return_value`` or assert calls.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, spec=AsyncSession, **kwargs)
        for name in _AWAITABLE_METHODS:
            setattr(self, name, AsyncMock(name=f"session.{name}"))
        self.execute.return_value = empty_result()
        self.scalars.return_value = empty_result()
        self.scalar.return_value = None
        self.get.return_value = None
        # Objects passed to add() / add_all() / delete(), in order.
        self.added: list[Any] = []
        self.deleted: list[Any] = []
        self.add.side_effect = self.added.append
        self.add_all.side_effect = lambda items: self.added.extend(list(items))
        self.delete.side_effect = self._delete
        # "commit" and "rollback", in the order they were awaited.
        self.transactions: list[str] = []
        self.commit.side_effect = self._commit
        self.rollback.side_effect = self._rollback

    async def _delete(self, instance: Any) -> None:
        self.deleted.append(instance)

    async def _commit(self) -> None:
        self.transactions.append("commit")

    async def _rollback(self) -> None:
        self.transactions.append("rollback")

    @property
    def commits(self) -> int:
        """How many times ``commit()`` was awaited."""
        return int(self.commit.await_count)

    @property
    def rollbacks(self) -> int:
        """How many times ``rollback()`` was awaited."""
        return int(self.rollback.await_count)

    def assert_committed(self, times: int | None = None) -> None:
        """Committed at least once (or exactly ``times``), and never rolled back."""
        if (self.commits == 0 if times is None else self.commits != times) or self.rollbacks:
            wanted = "at least once" if times is None else f"{times} time(s)"
            raise AssertionError(
                f"expected commit {wanted} and no rollback; "
                f"got {self.commits} commit(s), {self.rollbacks} rollback(s)"
            )

    def assert_rolled_back(self) -> None:
        """Rolled back, and not committed since."""
        if not self.transactions or self.transactions[-1] != "rollback":
            raise AssertionError(
                f"expected a rollback last; transactions were {self.transactions or 'none'}"
            )

    def _get_child_mock(self, **kw: Any) -> MagicMock:
        # Sync children (add, expunge_all, begin...): plain mocks, not AsyncMocks.
        return MagicMock(**kw)


def mock_task_session(entities: Iterable[Any] = ()) -> MockTaskSession:
    """A mock ``AsyncSession``; ``session.get(Model, id)`` returns the given ``entities`` by id.

    Ids compare as strings, so a ``UUID`` and its text find the same entity.
    """
    session = MockTaskSession()
    by_id = {str(getattr(entity, "id", None)): entity for entity in entities}
    if by_id:

        async def get(_model: Any, ident: Any, *args: Any, **kwargs: Any) -> Any:
            return by_id.get(str(ident))

        session.get.side_effect = get
    return session
