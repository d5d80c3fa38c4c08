"""The Celery task classes behind ``@simple_task`` and ``@db_task``.

``BaseTask`` is a ``celery.Task``: everything Celery offers (``delay``,
``apply_async``, signatures, canvas, its options) works unchanged. What it
adds happens in ``execute``, the body Celery runs on the worker: build a
``TaskContext``, run the user's function (on the process's event loop when it
is async, inside a transaction for db tasks), and turn a failure into a retry
or a final failure according to the exception type and the retry policy.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from functools import partial
from typing import Any, ClassVar, Generic, ParamSpec, TypeVar, Unpack

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from celery.result import AsyncResult
from celery.utils import uuid
from kombu.exceptions import EncodeError
from kombu.utils.json import dumps
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .context import TaskContext
from .delivery.after_commit import enqueue_after_commit
from .delivery.bulk import DEFAULT_BATCH_SIZE, dispatch_many
from .delivery.completions import AlreadyCompleted, CompletionMarker, completion_log
from .delivery.dedup import CLAIMED_OPTION, PERIOD_OPTION, deduplicator, run_once_key
from .delivery.options import DispatchOptions, TaskOptions
from .delivery.outbox import enqueue_via_outbox
from .delivery.publish import bounded_dispatch
from .event_loop import worker_loop
from .exceptions import (
    NON_RETRIABLE_ERRORS,
    NonRetriableTaskError,
    TaskArgumentError,
    TaskDispatchError,
    TaskResultError,
    TaskValidationError,
    is_retriable,
)
from .monitoring import Timer, record_dispatch, record_dispatch_failure
from .observability.hooks import hooks, lifecycle
from .retry import RetryPolicy
from .session import database

P = ParamSpec("P")
R = TypeVar("R")


def route_to_declared_queue(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any
) -> dict[str, str] | None:
    """Celery router: send a framework task to the queue its decorator names."""
    queue = getattr(task, "background_queue", None)
    return {"queue": queue} if queue else None


# Celery's own control-flow exceptions pass through untouched.
_CELERY_CONTROL = (Retry, Ignore, Reject)


class BaseTask(Task[P, R], Generic[P, R]):
    """Base of every framework task. Subclasses say how the body is run."""

    # We check arguments ourselves (without the context parameter) and name the task.
    typing = False
    # Celery's own word for errors that are part of normal operation: it does
    # not treat them as worker errors (INFO, no traceback, no error e-mail).
    throws = NON_RETRIABLE_ERRORS
    is_async: ClassVar[bool] = False

    # Set by the decorators on each task class.
    body: Callable[..., Any]
    body_signature: inspect.Signature
    policy: RetryPolicy
    background_queue: str = "default"
    # DatabaseTask checks the result inside its transaction, before the commit.
    checks_result_before_commit: ClassVar[bool] = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``task(ctx, ...)`` runs the body with that context (tests); otherwise Celery's call."""
        if args and isinstance(args[0], TaskContext):
            return args[0].run_directly(self, args[1:], kwargs)
        return super().__call__(*args, **kwargs)

    def run_with_context(
        self, ctx: TaskContext, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        """Run the body with ``ctx``: its result, or a coroutine for async tasks."""
        return self.body(ctx, *args, **kwargs)

    def run_directly(
        self, ctx: TaskContext, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        """Run the body with ``ctx`` in this process (``task(ctx, ...)``, in a test).

        The result, or a coroutine for async tasks. ``ctx`` also gets the
        lifecycle records a worker writes for the run (success; retry with its
        delay; final failure with its reason), so a test sees what the worker's
        log would say. The error itself reaches the caller: nothing is retried.
        """
        timer = Timer()
        if self.is_async:
            return self._run_directly_async(ctx, args, kwargs, timer)
        with self._recording_direct_failure(ctx, timer):
            result = self.run_with_context(ctx, args, kwargs)
        lifecycle.on_success(ctx, result, timer.stop())
        return result

    async def _run_directly_async(
        self, ctx: TaskContext, args: tuple[Any, ...], kwargs: Mapping[str, Any], timer: Timer
    ) -> Any:
        with self._recording_direct_failure(ctx, timer):
            result = await self.run_with_context(ctx, args, kwargs)
        lifecycle.on_success(ctx, result, timer.stop())
        return result

    @contextlib.contextmanager
    def _recording_direct_failure(self, ctx: TaskContext, timer: Timer) -> Iterator[None]:
        """Record a failure of the block as the worker would (retry or final), then re-raise."""
        try:
            yield
        except _CELERY_CONTROL:
            raise
        except Exception as exc:
            # Recorded inside the ``except`` block: the failure record carries the traceback.
            duration = timer.stop()
            reason, delay = self._failure_outcome(exc, ctx.attempt)
            if reason is None:
                lifecycle.on_retry(ctx, exc, delay, duration)
            else:
                lifecycle.on_failure(ctx, exc, reason, duration)
            raise

    # -- dispatch ---------------------------------------------------------

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

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        *extra: Any,
        **options: Any,
    ) -> Any:
        self.check_arguments(tuple(args or ()), kwargs or {})
        queue = str(getattr(options.get("queue"), "name", options.get("queue")) or "")
        queue = queue or self.background_queue
        deduplicated = task_id is not None or PERIOD_OPTION in options
        try:
            if deduplicated and not options.pop(CLAIMED_OPTION, False):
                # A custom id: deduplicated (dedup.py); comes back here once the lease is taken.
                with bounded_dispatch(self.app, self.name, [task_id] if task_id else []):
                    return deduplicator.send(
                        self,
                        task_id,
                        options,
                        lambda tid, opts: self.apply_async(args, kwargs, tid, *extra, **opts),
                    )
            # The id is chosen here so that a failed dispatch can name it.
            task_id = task_id or uuid()
            with bounded_dispatch(self.app, self.name, [task_id]):
                sent = super().apply_async(tuple(args or ()), kwargs, task_id, *extra, **options)
        except EncodeError as exc:
            raise TaskArgumentError(
                f"{self.name}: arguments must be JSON-serializable: {exc}"
            ) from exc
        except TaskDispatchError:
            record_dispatch_failure(self.name, queue, "raised")
            raise
        record_dispatch(self.name, queue)
        return sent

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
        ``options`` apply to every message. See ``internals/bulk.py``.
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

    # -- execution on the worker ------------------------------------------

    def execute(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What the worker runs for each message of this task."""
        ctx = self._context_for_request()
        timer = Timer()
        try:
            self._check_received_arguments(args, kwargs)
            hooks.before_run(ctx)
            outcome = self.run_with_context(ctx, args, kwargs)
            result = worker_loop.run(outcome) if self.is_async else outcome
            if not self.checks_result_before_commit:
                self.check_result(result)
        except _CELERY_CONTROL:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is classified, then re-raised
            raise self._after_failure(ctx, exc, timer.stop()) from None
        hooks.on_success(ctx, result, timer.stop())
        return result

    def check_result(self, result: Any) -> None:
        """Raise ``TaskResultError`` if the result backend could not store ``result``.

        Celery would find out only when storing it, after the success hooks
        (a "Task succeeded" line and metric for a task that then fails) and
        after a db task's commit. Checked with the encoder the backend uses.
        """
        if result is None or self.ignore_result or self.request.ignore_result:
            return
        try:
            dumps(result)
        except (TypeError, ValueError) as exc:
            raise TaskResultError(
                f"{self.name} returned a {type(result).__name__} that cannot be stored as "
                f"JSON ({exc}); return JSON types (dict, list, str, number, bool, None)"
            ) from None

    def _context_for_request(self) -> TaskContext:
        request = self.request
        delivery = request.delivery_info or {}
        # Bound to this run's id: under the threads pool an async body runs on
        # the event loop's thread, where Celery's thread-local ``self.request``
        # has no id.
        publish = None if self.ignore_result else partial(self._publish_progress, request)
        return TaskContext(
            task_id=request.id or "",
            task_name=self.name,
            attempt=request.retries or 0,
            queue=delivery.get("routing_key") or self.background_queue,
            publish_progress=publish,
        )

    def _publish_progress(self, request: Any, metrics: Mapping[str, Any]) -> None:
        # Stored with this run's request: an async body may run on the event
        # loop's thread (threads pool), where Celery's thread-local
        # ``self.request`` (which ``update_state`` would use) is empty, so the
        # attempt would read 0.
        self.backend.store_result(request.id, dict(metrics), "PROGRESS", request=request)

    def _check_received_arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        # A message that cannot be run as sent never will be: do not retry it.
        if (error := self.argument_error(args, kwargs)) is not None:
            raise TaskValidationError(error)

    def _failure_outcome(self, exc: Exception, retries: int) -> tuple[str | None, float]:
        """``(None, delay)``: retry after ``retries`` retries; ``(reason, 0)``: a final failure."""
        if not is_retriable(exc):
            return "non-retriable", 0.0
        if self.max_retries is not None and retries >= self.max_retries:
            return "retries exhausted", 0.0
        delay = self.policy.delay_for(
            retries, self.app.conf.get("background_retry_delay_scale", 1.0)
        )
        # An error may say how long to wait at least (an open circuit breaker).
        return None, max(delay, float(getattr(exc, "retry_after", 0) or 0))

    def _after_failure(self, ctx: TaskContext, exc: Exception, duration: float) -> BaseException:
        """The exception to raise: ``Retry`` for a retry, ``exc`` for a final failure."""
        reason, delay = self._failure_outcome(exc, self.request.retries or 0)
        if reason is not None:
            hooks.on_failure(ctx, exc, reason, duration)
            return exc
        hooks.on_retry(ctx, exc, delay, duration)
        try:
            return self.retry(exc=exc, countdown=delay)
        except Retry as retry:
            return retry


class SyncTask(BaseTask[P, R]):
    """A ``@simple_task`` on a plain function."""


class AsyncTask(BaseTask[P, R]):
    """A ``@simple_task`` on an ``async def``: runs on the process's event loop."""

    is_async = True


class DatabaseTask(BaseTask[P, R]):
    """A ``@db_task``: one ``AsyncSession`` per run, committed on success, rolled back on error."""

    is_async = True
    checks_result_before_commit = True

    def _context_for_request(self) -> TaskContext:
        ctx = super()._context_for_request()
        # Read here, in Celery's thread: the body may run on the loop's thread.
        ctx._run_once = run_once_key(self.request)
        return ctx

    def run_with_context(
        self, ctx: TaskContext, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Coroutine[Any, Any, Any]:
        return self._run_in_transaction(ctx, args, kwargs)

    async def _run_in_transaction(
        self, ctx: TaskContext, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        # A test passes its own session (a mock, or one joined to an outer
        # transaction); on a worker, the run opens and closes its own.
        owns_session = not ctx.has_session
        if owns_session:
            ctx._session = database.session_factory()()
        session = ctx.session
        once = ctx._run_once
        marker: CompletionMarker | None = None
        try:
            if once is not None:
                if await completion_log.completed(session, once[0]):
                    # The message came back (its worker died before acknowledging
                    # it) after this run's work had committed: see completions.py.
                    return self._already_completed(ctx)
                # The row goes with the first commit, the body's own included;
                # a batch commit of a bulk job does not complete the run.
                marker = CompletionMarker(
                    session, once[0], ctx.task_id, once[1], skip=lambda: ctx._committing_batch
                )
            result = await self.body(ctx, *args, **kwargs)
            self.check_result(result)
            if marker is not None and marker.duplicate:
                raise AlreadyCompleted  # the body swallowed it around its own commit
            await session.commit()
            return result
        except AlreadyCompleted:
            # Another delivery of this message committed while this one ran.
            with contextlib.suppress(Exception):
                await session.rollback()
            return self._already_completed(ctx)
        except BaseException as exc:
            # A rollback that fails too (the connection is gone) must not replace
            # the task's own error: that error decides whether the task is retried.
            with contextlib.suppress(Exception):
                await session.rollback()
            if marker is not None and marker.committed and isinstance(exc, Exception):
                await self._undo_completion(session, marker.token, exc)
            raise
        finally:
            if marker is not None:
                marker.detach()
            if owns_session:
                with contextlib.suppress(Exception):
                    await session.close()

    @staticmethod
    async def _undo_completion(session: AsyncSession, token: str, exc: Exception) -> None:
        """The body failed after an explicit commit wrote the row: delete it, so a retry runs."""
        try:
            await completion_log.forget(session, token)
        except Exception as undo_error:  # noqa: BLE001 - reported as the task's failure
            with contextlib.suppress(Exception):
                await session.rollback()
            # A retry would find the row and report success without running:
            # fail for good instead, saying what happened.
            raise NonRetriableTaskError(
                "the task failed after committing part of its work, and its completion "
                f"row could not be removed ({type(undo_error).__name__}: {undo_error}); "
                f"not retried: {type(exc).__name__}: {exc}"
            ) from exc

    @staticmethod
    def _already_completed(ctx: TaskContext) -> dict[str, Any]:
        ctx.log_info("Task already completed by an earlier delivery; skipped")
        return ctx.success_result(already_completed=True)
