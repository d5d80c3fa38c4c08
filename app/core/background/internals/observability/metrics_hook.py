"""The task hook that feeds the Prometheus metrics: runs by task and queue, durations, in flight.

The metric families are defined in ``monitoring.py`` (the specification's
``TaskMetrics``); ``metrics_export.py`` serves them.
"""

from __future__ import annotations

import weakref
from typing import Any

from ..context import TaskContext
from ..monitoring import task_metrics
from .hooks import TaskHook


class _TaskSeries:
    """The metric children of one (task, queue): ``labels()`` looked up once, not per run."""

    __slots__ = ("duration", "failed", "in_flight", "retried", "started", "succeeded")

    def __init__(self, task_name: str, queue: str) -> None:
        metrics = task_metrics()
        self.started = metrics.started.labels(task_name, queue)
        self.in_flight = metrics.in_flight.labels(task_name, queue)
        self.succeeded = metrics.succeeded.labels(task_name, queue)
        self.retried = metrics.retried.labels(task_name, queue)
        self.failed = metrics.failed.labels(task_name, queue)
        self.duration = {
            outcome: metrics.duration.labels(task_name, queue, outcome)
            for outcome in ("success", "retry", "failure", "revoked")
        }


class MetricsHook(TaskHook):
    """Counts task runs by task name and queue, their durations, and those in flight."""

    def __init__(self) -> None:
        # Runs whose ``before_run`` was called: a message rejected before it
        # (unreadable arguments) fails without ever being in flight.
        self._running: weakref.WeakSet[TaskContext] = weakref.WeakSet()
        self._series: dict[tuple[str, str], _TaskSeries] = {}

    def _of(self, ctx: TaskContext) -> _TaskSeries:
        key = (ctx.task_name, ctx.queue)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _TaskSeries(*key)
        return series

    def before_run(self, ctx: TaskContext) -> None:
        series = self._of(ctx)
        series.started.inc()
        series.in_flight.inc()
        self._running.add(ctx)

    def _finished(
        self, series: _TaskSeries, ctx: TaskContext, outcome: str, duration: float
    ) -> None:
        series.duration[outcome].observe(duration)
        if ctx in self._running:
            self._running.discard(ctx)
            series.in_flight.dec()

    def on_success(self, ctx: TaskContext, result: Any, duration: float) -> None:
        series = self._of(ctx)
        series.succeeded.inc()
        self._finished(series, ctx, "success", duration)

    def on_retry(self, ctx: TaskContext, exc: BaseException, delay: float, duration: float) -> None:
        series = self._of(ctx)
        series.retried.inc()
        self._finished(series, ctx, "retry", duration)

    def on_failure(
        self, ctx: TaskContext, exc: BaseException, reason: str, duration: float
    ) -> None:
        series = self._of(ctx)
        series.failed.inc()
        self._finished(series, ctx, "failure", duration)

    def on_revoked(self, ctx: TaskContext, duration: float) -> None:
        # No counter of its own: the run is no longer in flight, its time is kept.
        self._finished(self._of(ctx), ctx, "revoked", duration)

    def on_deferred(self, ctx: TaskContext, limit: str, key: str, wait: float) -> None:
        task_metrics().deferred.labels(ctx.task_name, ctx.queue, limit, key).inc()
