"""Test helpers for users of the framework: run a task body with no broker or worker.

``TaskTestContext`` records what a task logs and returns; ``mock_task_session``
stands in for an ``AsyncSession`` and records commits and rollbacks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from unittest.mock import AsyncMock, MagicMock

from sqlalchemy.ext.asyncio import AsyncSession

from .context import TaskContext
from .logging import SUCCESS, TaskLogger

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "success": SUCCESS,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


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
    """A TaskLogger that keeps every record (and still logs it)."""

    __slots__ = ("records",)

    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__(fields)
        self.records: list[LoggedRecord] = []

    def log(self, level: int, message: str, exc_info: bool = False, **fields: Any) -> None:
        name = logging.getLevelName(level).lower()
        self.records.append(LoggedRecord(name, message, dict(fields)))
        super().log(level, message, exc_info=exc_info, **fields)


class TaskTestContext(TaskContext):
    """A ``TaskContext`` for tests: records logs and results, with assertions."""

    def __init__(
        self,
        task_id: str = "test-task",
        session: Any = None,
        task_name: str = "test.task",
        attempt: int = 0,
        queue: str = "default",
    ) -> None:
        self.recorder = RecordingTaskLogger(
            {"task_id": task_id, "task_name": task_name, "queue": queue, "attempt": attempt}
        )
        super().__init__(
            task_id=task_id,
            task_name=task_name,
            attempt=attempt,
            queue=queue,
            session=session,
            logger=self.recorder,
            publish_progress=self._record_progress,
        )
        self.results: list[dict[str, Any]] = []
        self.progress: list[dict[str, Any]] = []

    def _record_progress(self, metrics: Any) -> None:
        self.progress.append(dict(metrics))

    @property
    def records(self) -> list[LoggedRecord]:
        """Every ``ctx.log_*`` call so far, in order."""
        return list(self.recorder.records)

    def success_result(self, **fields: Any) -> dict[str, Any]:
        result = super().success_result(**fields)
        self.results.append(result)
        return result

    # -- assertions -------------------------------------------------------

    def logged(self, level: str | None = None) -> list[LoggedRecord]:
        """The records of one level (``"info"``, ``"success"``...), or all of them."""
        return [r for r in self.recorder.records if level is None or r.level == level.lower()]

    def assert_logged(self, level: str, contains: str | None = None, **fields: Any) -> LoggedRecord:
        """The first record of ``level`` whose message contains ``contains`` and has ``fields``."""
        _check_level(level)
        for record in self.logged(level):
            if contains is not None and contains not in record.message:
                continue
            if all(record.fields.get(k, _MISSING) == v for k, v in fields.items()):
                return record
        wanted = f"a {level!r} record" + (f" containing {contains!r}" if contains else "")
        if fields:
            wanted += f" with {fields!r}"
        raise AssertionError(f"expected {wanted}; logged:\n{self._transcript()}")

    def assert_logged_success(self, contains: str | None = None, **fields: Any) -> LoggedRecord:
        return self.assert_logged("success", contains, **fields)

    def assert_not_logged(self, level: str) -> None:
        _check_level(level)
        if self.logged(level):
            raise AssertionError(f"expected no {level!r} records; logged:\n{self._transcript()}")

    def assert_no_errors(self) -> None:
        self.assert_not_logged("error")

    def _transcript(self) -> str:
        return "\n".join(f"  {record}" for record in self.recorder.records) or "  (nothing)"


def _check_level(level: str) -> None:
    if level.lower() not in _LEVELS:
        raise ValueError(f"unknown level {level!r}; valid: {', '.join(_LEVELS)}")


_MISSING = object()


class MockTaskSession(MagicMock):
    """Stands in for ``AsyncSession``: awaitable methods, recorded commits and rollbacks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, spec=AsyncSession, **kwargs)
        for name in (
            "execute",
            "get",
            "flush",
            "commit",
            "rollback",
            "refresh",
            "scalar",
            "scalars",
            "delete",
            "close",
            "merge",
            "stream",
            "stream_scalars",
            "get_one",
            "run_sync",
            "connection",
            "invalidate",
            "reset",
        ):
            setattr(self, name, AsyncMock(name=f"session.{name}"))
        self.added: list[Any] = []
        self.add.side_effect = self.added.append
        self.add_all.side_effect = lambda items: self.added.extend(list(items))

    @property
    def commits(self) -> int:
        return int(self.commit.await_count)

    @property
    def rollbacks(self) -> int:
        return int(self.rollback.await_count)

    def _get_child_mock(self, **kw: Any) -> MagicMock:
        return MagicMock(**kw)


def mock_task_session(entities: Iterable[Any] = ()) -> Any:
    """A mock ``AsyncSession``; ``session.get(Model, id)`` finds the given ``entities`` by id."""
    session = MockTaskSession()
    by_id = {str(getattr(entity, "id", None)): entity for entity in entities}

    async def get(_model: Any, ident: Any, *args: Any, **kwargs: Any) -> Any:
        return by_id.get(str(ident))

    session.get.side_effect = get
    return session
