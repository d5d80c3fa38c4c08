"""The Celery task classes behind ``@simple_task`` and ``@db_task``: what callers use.

``BaseTask`` is a ``celery.Task``: everything Celery offers (``delay``,
``apply_async``, signatures, canvas, its options) works unchanged. It adds
the framework's ways to send (each one a caller of ``delivery.publish``, the
one way out) and the typed ``options()``. How a task runs on the worker lives
in ``runner.py`` (as Celery keeps ``app/task.py`` apart from ``app/trace.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Generic, ParamSpec, TypeVar, Unpack

from celery import Task
from celery.result import AsyncResult
from celery.utils import uuid
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from . import runner
from .admission.limits import Limits
from .context import TaskContext
from .delivery.after_commit import enqueue_after_commit
from .delivery.bulk import dispatch_many
from .delivery.dedup import deduplicator, is_deduplicated
from .delivery.options import DispatchOptions, TaskOptions
from .delivery.outbox import enqueue_via_outbox
from .delivery.publish import DEFAULT_BATCH_SIZE, Message, publish
from .exceptions import NON_RETRIABLE_ERRORS, TaskArgumentError
from .retry import RetryPolicy

P = ParamSpec("P")
R = TypeVar("R")


def route_to_declared_queue(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any
) -> dict[str, str] | None:
    """Celery router: send a framework task to the queue its decorator names."""
    queue = getattr(task, "background_queue", None)
    return {"queue": queue} if queue else None


class BaseTask(Task[P, R], Generic[P, R]):
    """Base of every framework task."""

    # We check arguments ourselves (without the context parameter) and name the task.
    typing = False
    # Celery's own word for errors that are part of normal operation: it does
    # not treat them as worker errors (INFO, no traceback, no error e-mail).
    throws = NON_RETRIABLE_ERRORS
    # How the runner runs the body: on the event loop; in a transaction.
    is_async: ClassVar[bool] = False
    uses_database: ClassVar[bool] = False

    # Set by the decorators on each task class.
    body: Callable[..., Any]
    body_signature: inspect.Signature
    policy: RetryPolicy
    # Its rate limit and concurrency cap (``admission/limits.py``), if it declares any.
    limits: Limits | None = None
    # The worker's handler of its messages: Celery's, screened by the limits
    # before the pool when the task has any (``admission/consumer.py``).
    Strategy = "app.core.background.internals.admission.consumer:strategy"
    background_queue: str = "default"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``task(ctx, ...)`` runs the body with that context (tests); otherwise Celery's call."""
        if args and isinstance(args[0], TaskContext):
            return args[0].run_directly(self, args[1:], kwargs)
        return super().__call__(*args, **kwargs)

    def run_directly(
        self, ctx: TaskContext, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        """Run the body with ``ctx`` in this process (see ``runner.run_directly``)."""
        return runner.run_directly(self, ctx, args, kwargs)

    def execute(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What the worker runs for each message of this task (see ``runner.execute``)."""
        return runner.execute(self, args, kwargs)

    def argument_error(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
        """Why the body cannot be called with these arguments (None if it can)."""
        try:
            self.body_signature.bind(None, *args, **kwargs)
        except TypeError as exc:
            return f"{self.name}: {exc}"
        return None

    def check_arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """Raise ``TaskArgumentError`` if the body cannot be called with these arguments."""
        if (error := self.argument_error(args, kwargs)) is not None:
            raise TaskArgumentError(error)

    # -- sending -----------------------------------------------------------------------

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Celery's ``apply_async``; a custom ``task_id`` is deduplicated (``delivery/dedup``)."""
        celery_options = {
            name: value
            for name, value in (
                ("producer", producer), ("link", link), ("link_error", link_error),
                ("shadow", shadow),
            )
            if value is not None
        }  # fmt: skip
        message = Message(
            self, tuple(args or ()), dict(kwargs or {}), task_id or uuid(),
            {**celery_options, **options},
        )  # fmt: skip
        if is_deduplicated(task_id, options):
            return deduplicator.send(self.app, message)
        return publish(self.app, message)

    def delay_many(
        self,
        calls: Iterable[Mapping[str, Any]],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        **options: Any,
    ) -> list[AsyncResult[R]]:
        """Send one message per keyword-argument mapping in ``calls``, in one go.

        Every call is checked first (a bad one sends none); then all go through
        one producer connection and, on Redis, one pipeline per ``batch_size``.
        ``options`` apply to every message. See ``delivery/bulk.py``.
        """
        return dispatch_many(self, calls, batch_size=batch_size, **options)

    def delay_on_commit(
        self, session: AsyncSession | Session, /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncResult[R]:
        """Send when ``session``'s transaction commits; never if it rolls back.

        Arguments are checked now; the result's id is the id the task will have.
        """
        return self.AsyncResult(enqueue_after_commit(session, self, args, kwargs))

    def delay_via_outbox(
        self, session: AsyncSession | Session, /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncResult[R]:
        """Write the task to the outbox in ``session``'s transaction; the relay sends it."""
        return self.AsyncResult(enqueue_via_outbox(session, self, args, kwargs))

    def options(self, **options: Unpack[DispatchOptions]) -> TaskOptions[P, R]:
        """Celery options, then a typed dispatch: ``task.options(countdown=5).delay(x=1)``."""
        return TaskOptions(self, options)


class SyncTask(BaseTask[P, R]):
    """A ``@simple_task`` on a plain function."""


class AsyncTask(BaseTask[P, R]):
    """A ``@simple_task`` on an ``async def``: runs on the process's event loop."""

    is_async = True


class DatabaseTask(BaseTask[P, R]):
    """A ``@db_task``: one ``AsyncSession`` per run, committed on success, rolled back on error."""

    is_async = True
    uses_database = True
