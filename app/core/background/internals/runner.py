"""How a task runs: what the worker does with each message of a framework task.

The task class (``base.py``) is what callers use; this module is what runs,
as Celery keeps ``app/task.py`` apart from ``app/trace.py``. Celery's tracer
calls the task, the task calls ``execute``, and ``execute``:

1. builds the run's ``TaskContext`` from Celery's request;
2. checks the arguments the message carried (a message that cannot run never will),
   and that earlier runs of it lost with their process (``TaskProcessLostError``)
   leave the retry policy room for this one;
3. passes the task's limits (``admission/gate.py``): a run that must wait is
   sent again for later and ends here, acknowledged; an admitted one holds
   its concurrency slot until it ends; then calls the hooks' ``before_run``;
4. runs the body: a sync body in this thread; an async one on the process's
   event loop (``event_loop.py``); a db task's inside a transaction on a
   session of its own, committed after the body, with its run-once
   completion row when it was sent with a ``task_id`` (``delivery/completions.py``);
5. on success checks that the result can be stored, then calls ``on_success``;
6. on failure decides: a retry after the policy's delay (``Retry``, with
   ``on_retry``), or a final failure (the error itself, with ``on_failure``).

``run_directly`` runs a body with a context a test built (``task(ctx, ...)``),
recording what the worker would log.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from celery import states
from celery.exceptions import Ignore, Reject, Retry
from kombu.utils.json import dumps
from sqlalchemy.ext.asyncio import AsyncSession

from .admission.gate import MustWait, admission, defer
from .context import TaskContext
from .delivery.completions import AlreadyCompleted, CompletionMarker, completion_log
from .delivery.dedup import run_once_key
from .event_loop import worker_loop
from .exceptions import (
    NonRetriableTaskError,
    TaskArgumentsRefusedError,
    TaskProcessLostError,
    TaskResultError,
    is_retriable,
)
from .logging import current_task_fields
from .monitoring import Timer
from .observability.hooks import hooks, lifecycle
from .operations.cancel import TaskCancelledError, cancel_when_revoked, revoked_in_backend
from .registry import FIRST_FAILURE_HEADER
from .retry import delay_scale
from .session import database
from .trace_context import FIRST_ATTEMPT_HEADER, current_traceparent
from .transport.result_backend import lost_runs

if TYPE_CHECKING:
    from .base import BaseTask

# Celery's own control-flow exceptions pass through untouched.
_CELERY_CONTROL = (Retry, Ignore, Reject)


def execute(task: BaseTask[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What the worker runs for each message of ``task`` (see the module doc)."""
    ctx = _context_for_request(task)
    # Plain log lines of the run carry its id (logging.current_task_fields).
    fields = current_task_fields.set(ctx.logger.fields)
    try:
        return _execute(task, ctx, args, kwargs)
    finally:
        current_task_fields.reset(fields)


def _execute(
    task: BaseTask[Any, Any], ctx: TaskContext, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    timer = Timer()
    if (lost := _runs_lost_before(task)) is not None:
        # Final before it starts: not classified (it is no failure of the body).
        hooks.on_failure(ctx, lost, "retries exhausted", timer.stop())
        raise lost
    try:
        if (error := task.argument_error(args, kwargs)) is not None:
            raise TaskArgumentsRefusedError(error)
        ticket = admission.enter(task, ctx, args, kwargs)
        try:
            hooks.before_run(ctx)
            result = _run_body(task, ctx, args, kwargs)
            if task.is_async:
                revoked = partial(revoked_in_backend, task.app, ctx.task_id)
                result = worker_loop.run(cancel_when_revoked(result, revoked, ctx.task_id))
            if not task.uses_database:
                check_result(task, result)
        finally:
            if ticket is not None:
                ticket.release()
    except MustWait as waiting:
        raise _deferred(task, ctx, args, kwargs, waiting) from None
    except Reject as reject:
        if getattr(reject, "requeue", False):  # celery-types does not declare it
            # Back to the queue, not lost: its next run must not count this one.
            task.backend.store_result(ctx.task_id, None, states.PENDING, request=task.request)
        raise
    except TaskCancelledError:
        hooks.on_revoked(ctx, timer.stop())
        raise
    except _CELERY_CONTROL:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is classified, then re-raised
        raise _after_failure(task, ctx, exc, timer.stop()) from None
    hooks.on_success(ctx, result, timer.stop())
    return result


def _deferred(
    task: BaseTask[Any, Any],
    ctx: TaskContext,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    waiting: MustWait,
) -> BaseException:
    """The exception ending a run that must wait for its limits (see ``admission/gate.py``)."""
    hooks.on_deferred(ctx, waiting.limit, waiting.key, waiting.wait)
    return defer(task, task.request, ctx, args, kwargs, waiting)


def _runs_lost_before(task: BaseTask[Any, Any]) -> TaskProcessLostError | None:
    """The error ending this run before it starts, when lost runs used up its retries.

    A process that dies running a task (SIGKILL, out of memory; under the
    asyncio pool, every run of the process) acknowledges nothing: the broker
    delivers the message again with the same attempt number, so the policy
    alone would never bound a task that kills its process. The result
    backend counts such runs (``transport/result_backend.py``; the Redis
    backend only) and each counts as an attempt here.
    """
    request = task.request
    seen = lost_runs.get()
    if seen is None or seen[0] != request.id or not seen[1] or task.max_retries is None:
        return None
    retries, lost = request.retries or 0, seen[1]
    if retries + lost <= task.max_retries:
        return None
    return TaskProcessLostError(
        f"the process running this task died {lost} time(s) before acknowledging it "
        f"({retries} retries besides; max_retries={task.max_retries})"
    )


def run_directly(
    task: BaseTask[Any, Any], ctx: TaskContext, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Any:
    """Run the body with ``ctx`` in this process (``task(ctx, ...)``, in a test).

    The result, or a coroutine for async tasks. ``ctx`` also gets the
    lifecycle records a worker writes for the run (success; retry with its
    delay; final failure with its reason), so a test sees what the worker's
    log would say. The error itself reaches the caller: nothing is retried.
    """
    timer = Timer()
    if task.is_async:
        return _run_directly_async(task, ctx, args, kwargs, timer)
    with _recording_direct_failure(task, ctx, timer):
        result = _run_body(task, ctx, args, kwargs)
    lifecycle.on_success(ctx, result, timer.stop())
    return result


async def _run_directly_async(
    task: BaseTask[Any, Any],
    ctx: TaskContext,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    timer: Timer,
) -> Any:
    with _recording_direct_failure(task, ctx, timer):
        result = await _run_body(task, ctx, args, kwargs)
    lifecycle.on_success(ctx, result, timer.stop())
    return result


@contextlib.contextmanager
def _recording_direct_failure(
    task: BaseTask[Any, Any], ctx: TaskContext, timer: Timer
) -> Iterator[None]:
    """Record a failure of the block as the worker would (retry or final), then re-raise."""
    try:
        yield
    except _CELERY_CONTROL:
        raise
    except Exception as exc:
        # Recorded inside the ``except`` block: the failure record carries the traceback.
        duration = timer.stop()
        reason, delay = failure_outcome(task, exc, ctx.attempt)
        if reason is None:
            lifecycle.on_retry(ctx, exc, delay, duration)
        else:
            lifecycle.on_failure(ctx, exc, reason, duration)
        raise


def _run_body(
    task: BaseTask[Any, Any], ctx: TaskContext, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Any:
    """The body's result, or (async tasks) the coroutine that runs it."""
    if task.uses_database:
        return _run_in_transaction(task, ctx, args, kwargs)
    return task.body(ctx, *args, **kwargs)


def _context_for_request(task: BaseTask[Any, Any]) -> TaskContext:
    request = task.request
    delivery = request.delivery_info or {}
    # Bound to this run's request: under the threads pool an async body runs on
    # the event loop's thread, where Celery's thread-local ``task.request`` (which
    # ``update_state`` would use) is empty, so the attempt would read 0.
    publish = None if task.ignore_result else partial(_publish_progress, task, request)
    return TaskContext(
        task_id=request.id or "",
        task_name=task.name,
        attempt=request.retries or 0,
        queue=delivery.get("routing_key") or task.background_queue,
        publish_progress=publish,
        # Read here, in Celery's thread: the body may run on the loop's thread.
        run_once=run_once_key(request) if task.uses_database else None,
    )


def _publish_progress(task: BaseTask[Any, Any], request: Any, metrics: Mapping[str, Any]) -> None:
    task.backend.store_result(request.id, dict(metrics), "PROGRESS", request=request)


def check_result(task: BaseTask[Any, Any], result: Any) -> None:
    """Raise ``TaskResultError`` if the result backend could not store ``result``.

    Celery would find out only when storing it, after the success hooks
    (a "Task succeeded" line and metric for a task that then fails) and
    after a db task's commit. Checked with the encoder the backend uses.
    """
    if result is None or task.ignore_result or task.request.ignore_result:
        return
    try:
        dumps(result)
    except (TypeError, ValueError) as exc:
        raise TaskResultError(
            f"{task.name} returned a {type(result).__name__} that cannot be stored as "
            f"JSON ({exc}); return JSON types (dict, list, str, number, bool, None)"
        ) from None


# -- failures --------------------------------------------------------------------------


def failure_outcome(
    task: BaseTask[Any, Any], exc: Exception, retries: int
) -> tuple[str | None, float]:
    """``(None, delay)``: retry after ``retries`` retries; ``(reason, 0)``: a final failure."""
    # The delay of a final failure is never read (equivalent mutants): pragma: no mutate
    if not is_retriable(exc):
        return "non-retriable", 0.0  # pragma: no mutate
    if task.max_retries is not None and retries >= task.max_retries:
        return "retries exhausted", 0.0  # pragma: no mutate
    delay = task.policy.delay_for(retries, delay_scale(task.app))
    # An error may say how long to wait at least (an open circuit breaker).
    hint = getattr(exc, "retry_after", None)
    # No hint is no floor: the delay is never negative, so "or -1" is the same. pragma: no mutate
    return None, max(delay, float(hint or 0))  # pragma: no mutate


def _after_failure(
    task: BaseTask[Any, Any], ctx: TaskContext, exc: Exception, duration: float
) -> BaseException:
    """The exception to raise: ``Retry`` for a retry, ``exc`` for a final failure."""
    reason, delay = failure_outcome(task, exc, task.request.retries)
    if reason is not None:
        hooks.on_failure(ctx, exc, reason, duration)
        return exc
    hooks.on_retry(ctx, exc, delay, duration)
    try:
        return task.retry(exc=exc, countdown=delay, headers=_retry_headers(task.request))
    except Retry as retry:
        return retry


def _retry_headers(request: Any) -> dict[str, Any]:
    """The message's headers, kept by the retry, with the time of the first failure added.

    Tracing on: also the first attempt's span (its ``traceparent``), which every
    later attempt's span links to.
    """
    headers = dict(getattr(request, "headers", None) or {})
    # Celery gives custom headers as request attributes too: either holds it.
    first = headers.get(FIRST_FAILURE_HEADER) or getattr(request, FIRST_FAILURE_HEADER, None)
    headers[FIRST_FAILURE_HEADER] = first or time.time()
    first_span = headers.get(FIRST_ATTEMPT_HEADER) or getattr(request, FIRST_ATTEMPT_HEADER, None)
    if first_span := first_span or current_traceparent():
        headers[FIRST_ATTEMPT_HEADER] = first_span
    return headers


# -- the transaction of a db task ---------------------------------------------------------


async def _run_in_transaction(
    task: BaseTask[Any, Any], ctx: TaskContext, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Any:
    # A test passes its own session (a mock, or one joined to an outer
    # transaction); on a worker, the run opens and closes its own.
    owns_session = not ctx.has_session
    if owns_session:
        ctx = ctx.evolve(session=database.session_factory()())
    session = ctx.session
    once = ctx.run_once
    marker: CompletionMarker | None = None
    try:
        if once is not None:
            if await completion_log.completed(session, once[0]):
                # The message came back (its worker died before acknowledging
                # it) after this run's work had committed: see completions.py.
                return _already_completed(ctx)
            # The row goes with the first commit, the body's own included;
            # a batch commit of a bulk job does not complete the run.
            marker = CompletionMarker(
                session, once[0], ctx.task_id, once[1], skip=lambda: ctx.committing_batch
            )
        result = await task.body(ctx, *args, **kwargs)
        check_result(task, result)
        if marker is not None and marker.duplicate:
            raise AlreadyCompleted  # the body swallowed it around its own commit
        await session.commit()
        return result
    except AlreadyCompleted:
        # Another delivery of this message committed while this one ran.
        with contextlib.suppress(Exception):
            await session.rollback()
        return _already_completed(ctx)
    except BaseException as exc:
        # A rollback that fails too (the connection is gone) must not replace
        # the task's own error: that error decides whether the task is retried.
        with contextlib.suppress(Exception):
            await session.rollback()
        if marker is not None and marker.committed and isinstance(exc, Exception):
            await _undo_completion(session, marker.token, exc)
        raise
    finally:
        if marker is not None:
            marker.detach()
        # After the commit or rollback the session holds no connection; close() only
        # empties its identity map, which goes with the session anyway: pragma: no mutate
        if owns_session:  # pragma: no mutate
            with contextlib.suppress(Exception):
                await session.close()


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


def _already_completed(ctx: TaskContext) -> dict[str, Any]:
    ctx.log_info("Task already completed by an earlier delivery; skipped")
    return ctx.success_result(already_completed=True)
