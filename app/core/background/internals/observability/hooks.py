"""Hooks around a task run: where logging, metrics and other cross-cutting work attach.

A hook subclasses ``TaskHook`` and overrides what it needs; every method is a
no-op by default. A hook that raises is logged and ignored: it never fails
the task it observes.
"""

from __future__ import annotations

import logging
from typing import Any

from ..context import TaskContext
from ..logging import FRAMEWORK_LOGGER_NAME, SUCCESS, mark_traceback_logged

_log = logging.getLogger(FRAMEWORK_LOGGER_NAME)


class TaskHook:
    """Called by the worker around each task run."""

    def before_run(self, ctx: TaskContext) -> None:
        """The task is about to run."""

    def on_success(self, ctx: TaskContext, result: Any, duration: float) -> None:
        """The task returned ``result`` after ``duration`` seconds."""

    def on_retry(self, ctx: TaskContext, exc: BaseException, delay: float, duration: float) -> None:
        """The task failed with ``exc`` and will run again in ``delay`` seconds."""

    def on_failure(
        self, ctx: TaskContext, exc: BaseException, reason: str, duration: float
    ) -> None:
        """The task failed for good (``reason``: non-retriable or retries exhausted)."""

    def on_revoked(self, ctx: TaskContext, duration: float) -> None:
        """The task was revoked while it ran: its body was cancelled after ``duration`` seconds."""

    def on_deferred(self, ctx: TaskContext, limit: str, key: str, wait: float) -> None:
        """The run may not start yet (``limit`` of ``key``): it comes back in ``wait`` seconds.

        Nothing ran (no ``before_run``): the task's limits sent it back.
        """


class LifecycleLogger(TaskHook):
    """The framework's own log lines: start, success, retry, final failure."""

    def before_run(self, ctx: TaskContext) -> None:
        ctx.log_debug("Task started")

    def on_success(self, ctx: TaskContext, result: Any, duration: float) -> None:
        ctx.logger.bind(duration=round(duration, 6), outcome="success")
        ctx.logger.log(SUCCESS, "Task succeeded")

    def on_retry(self, ctx: TaskContext, exc: BaseException, delay: float, duration: float) -> None:
        ctx.logger.bind(duration=round(duration, 6), outcome="retry")
        ctx.log_warning(
            "Task failed, will retry",
            retry_in=round(delay, 3),
            error_type=type(exc).__name__,
            error=str(exc),
        )

    def on_revoked(self, ctx: TaskContext, duration: float) -> None:
        ctx.logger.bind(duration=round(duration, 6), outcome="revoked")
        ctx.log_warning("Task revoked while running: cancelled")

    def on_deferred(self, ctx: TaskContext, limit: str, key: str, wait: float) -> None:
        ctx.log_info("Task waiting for its limit", limit=limit, key=key, wait=round(wait, 3))

    def on_failure(
        self, ctx: TaskContext, exc: BaseException, reason: str, duration: float
    ) -> None:
        ctx.logger.bind(duration=round(duration, 6), outcome="failure")
        # The one line of a final failure, with its traceback: Celery's own
        # "raised unexpected/expected" line is dropped for framework tasks
        # (CeleryTaskRecordFilter); the mark keeps the traceback single should
        # Celery's line ever get through.
        mark_traceback_logged(exc)
        ctx.logger.log(
            logging.ERROR,
            "Task failed",
            exc_info=True,
            reason=reason,
            error_type=type(exc).__name__,
            error=str(exc),
        )


class HookRegistry:
    """The hooks of this process, called in registration order after the built-in ones."""

    def __init__(self, *builtin: TaskHook) -> None:
        self._builtin = builtin
        self._hooks: list[TaskHook] = list(builtin)

    def register(self, hook: TaskHook) -> TaskHook:
        self._hooks.append(hook)
        return hook

    def unregister(self, hook: TaskHook) -> None:
        self._hooks.remove(hook)

    def clear(self) -> None:
        """Back to the built-in hooks only (tests)."""
        self._hooks[:] = self._builtin

    def __iter__(self) -> Any:
        return iter(tuple(self._hooks))

    def before_run(self, ctx: TaskContext) -> None:
        for hook in self._hooks:
            _guarded(hook.before_run, ctx)

    def on_success(self, ctx: TaskContext, result: Any, duration: float) -> None:
        for hook in self._hooks:
            _guarded(hook.on_success, ctx, result, duration)

    def on_retry(self, ctx: TaskContext, exc: BaseException, delay: float, duration: float) -> None:
        for hook in self._hooks:
            _guarded(hook.on_retry, ctx, exc, delay, duration)

    def on_failure(
        self, ctx: TaskContext, exc: BaseException, reason: str, duration: float
    ) -> None:
        for hook in self._hooks:
            _guarded(hook.on_failure, ctx, exc, reason, duration)

    def on_revoked(self, ctx: TaskContext, duration: float) -> None:
        for hook in self._hooks:
            _guarded(hook.on_revoked, ctx, duration)

    def on_deferred(self, ctx: TaskContext, limit: str, key: str, wait: float) -> None:
        for hook in self._hooks:
            _guarded(hook.on_deferred, ctx, limit, key, wait)


def _guarded(method: Any, *args: Any) -> None:
    try:
        method(*args)
    except Exception:  # noqa: BLE001 - a hook must never fail the task
        _log.exception("Task hook %r failed; the task is not affected", method)


# Also called on its own for a run in a test (``task(ctx, ...)``, see
# ``runner.run_directly``), where the other hooks (metrics, the users') stay out.
lifecycle = LifecycleLogger()
hooks = HookRegistry(lifecycle)
