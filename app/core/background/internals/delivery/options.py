"""Typed dispatch with options: ``task.options(countdown=5).delay(entity_id=...)``.

Celery's ``apply_async(args, kwargs, **options)`` takes the arguments as a
tuple and a dict, which no type checker can hold against the function's
parameters. ``options(...)`` takes the Celery options first and returns an
object whose ``delay`` / ``delay_on_commit`` / ``delay_via_outbox`` keep the
task's own signature (``ParamSpec``), so mypy checks both.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypedDict, TypeVar

from celery.result import AsyncResult
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from ..retry import QueueName
from .after_commit import enqueue_after_commit
from .outbox import enqueue_via_outbox

if TYPE_CHECKING:
    from ..base import BaseTask

P = ParamSpec("P")
R = TypeVar("R")


class DispatchOptions(TypedDict, total=False):
    """The Celery options ``options()`` accepts (all optional)."""

    task_id: str
    countdown: float
    eta: datetime
    expires: float | datetime
    priority: int
    queue: QueueName
    headers: dict[str, Any]


class TaskOptions(Generic[P, R]):
    """A task bound to Celery options; dispatch it with its own typed parameters."""

    def __init__(self, task: BaseTask[P, R], options: DispatchOptions) -> None:
        self.task = task
        self.celery_options: dict[str, Any] = dict(options)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        result: AsyncResult[R] = self.task.apply_async(args, kwargs, **self.celery_options)
        return result

    def delay_on_commit(
        self, session: AsyncSession | Session, /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncResult[R]:
        task_id = enqueue_after_commit(session, self.task, args, kwargs, **self.celery_options)
        return self.task.AsyncResult(task_id)

    def delay_via_outbox(
        self, session: AsyncSession | Session, /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncResult[R]:
        task_id = enqueue_via_outbox(session, self.task, args, kwargs, **self.celery_options)
        return self.task.AsyncResult(task_id)
