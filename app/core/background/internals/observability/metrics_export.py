"""Prometheus metrics: fed by a task hook, exported by the worker and the API.

Under the prefork pool every task runs in a child process, each with its own
memory, so prometheus-client's multiprocess mode is used: each process writes
its values to files in one folder and the exporter sums them. The worker's main
process prepares that folder before the pool forks (``enable_multiprocess``)
and serves ``/metrics`` from it; a child that exits marks itself dead so that
its in-flight gauge no longer counts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
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
            for outcome in ("success", "retry", "failure")
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


# -- multiprocess mode ----------------------------------------------------------

# Set by ``enable_multiprocess``; inherited by forked children.
_multiprocess_dir: Path | None = None


def enable_multiprocess(directory: str | Path | None, *, wipe: bool) -> Path:
    """Switch this process (and the children it forks) to multiprocess metrics.

    ``directory`` None: a new temporary folder. ``wipe``: delete the values a
    previous run left there (only the process that owns the folder may do so).
    Must run before the first metric value is created in this process.
    """
    from prometheus_client import values

    path = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="prometheus-"))
    if wipe and path.exists():
        for stale in path.glob("*.db"):
            stale.unlink()
    path.mkdir(parents=True, exist_ok=True)
    # prometheus-client reads this variable (here and in forked children), and
    # chose its value class when it was imported: choose again now.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    global _multiprocess_dir
    _multiprocess_dir = path
    return path


def mark_process_dead(pid: int) -> None:
    """Forget the live gauges of an exited process (its counters stay summed)."""
    from prometheus_client import multiprocess

    if _multiprocess_dir is not None:
        multiprocess.mark_process_dead(pid, str(_multiprocess_dir))  # type: ignore[no-untyped-call]


def remove_multiprocess_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _registry() -> Any:
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    if _multiprocess_dir is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(_multiprocess_dir))  # type: ignore[no-untyped-call]
    return registry


def render_metrics() -> tuple[bytes, str]:
    """The current metrics in the text exposition format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    task_metrics()  # every family listed from the first scrape, before any task
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def start_metrics_server(port: int, host: str) -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; the server object."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=_registry())
    return server
