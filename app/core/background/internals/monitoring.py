"""Measuring what tasks do: durations, counters, and the Prometheus metrics."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


class Timer:
    """Measures elapsed wall-clock time with a monotonic clock.

    Usable as a context manager or by reading ``elapsed`` while it runs.
    """

    __slots__ = ("_started", "_stopped")

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._stopped: float | None = None

    def __enter__(self) -> Timer:
        self._started = time.perf_counter()
        self._stopped = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> float:
        if self._stopped is None:
            self._stopped = time.perf_counter()
        return self.elapsed

    @property
    def elapsed(self) -> float:
        """Seconds since the start (until ``stop()``, if it was called)."""
        end = self._stopped if self._stopped is not None else time.perf_counter()
        return end - self._started


class StatsCounter:
    """Named counters for a task's work: ``processed``, ``skipped``, ``missing``..."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def increment(self, name: str, by: int = 1) -> int:
        value = self._counts.get(name, 0) + by
        self._counts[name] = value
        return value

    def set(self, name: str, value: int) -> None:
        self._counts[name] = value

    def get(self, name: str, default: int = 0) -> int:
        return self._counts.get(name, default)

    def to_dict(self) -> dict[str, int]:
        return dict(self._counts)

    def __repr__(self) -> str:
        return f"StatsCounter({self._counts!r})"


# -- Prometheus metrics ---------------------------------------------------------
#
# The metric objects are created on first use, not at import: under the prefork
# pool the worker switches prometheus-client to multiprocess mode (see
# ``metrics.py``) before any value exists, and values created earlier would stay
# private to one process.

BREAKER_STATES = {"closed": 0, "open": 1, "half_open": 2}


class TaskMetrics:
    """The framework's Prometheus metrics (one instance per process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        reg = registry if registry is not None else REGISTRY
        labels = ("task", "queue")
        self.started = Counter(
            "background_tasks_started", "Task runs started", labels, registry=reg
        )
        self.succeeded = Counter(
            "background_tasks_succeeded", "Task runs that succeeded", labels, registry=reg
        )
        self.failed = Counter(
            "background_tasks_failed", "Task runs that failed for good", labels, registry=reg
        )
        self.retried = Counter(
            "background_tasks_retried", "Task runs that failed and were retried", labels,
            registry=reg,
        )  # fmt: skip
        self.deduplicated = Counter(
            "background_tasks_deduplicated", "Tasks skipped as duplicates", labels, registry=reg
        )
        # The key label is the limit's key (a tenant...): as many series as keys.
        self.deferred = Counter(
            "background_tasks_deferred",
            "Runs sent back to wait for the task's rate limit or concurrency cap, by key",
            (*labels, "limit", "key"),
            registry=reg,
        )
        self.dispatched = Counter(
            "background_tasks_dispatched", "Tasks sent to the broker", labels, registry=reg
        )
        self.dispatch_failures = Counter(
            "background_dispatch_failures",
            "Dispatches the broker did not take, by what became of the task: "
            "raised (to the caller), deferred (to the outbox), lost",
            (*labels, "outcome"),
            registry=reg,
        )
        self.duration = Histogram(
            "background_task_duration_seconds",
            "Duration of task runs, by outcome",
            (*labels, "outcome"),
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
            registry=reg,
        )
        self.in_flight = Gauge(
            "background_tasks_in_flight", "Task runs in progress", labels,
            multiprocess_mode="livesum", registry=reg,
        )  # fmt: skip
        self.breaker_state = Gauge(
            "background_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            ("breaker",),
            multiprocess_mode="livemax",
            registry=reg,
        )


_metrics: TaskMetrics | None = None
_metrics_lock = threading.Lock()


def task_metrics() -> TaskMetrics:
    """This process's ``TaskMetrics``, created on first use."""
    global _metrics
    if _metrics is None:
        with _metrics_lock:
            if _metrics is None:
                _metrics = TaskMetrics()
    return _metrics


def record_dispatch(task_name: str, queue: str) -> None:
    """Count one task sent (called by ``BaseTask.apply_async``)."""
    task_metrics().dispatched.labels(task_name, queue).inc()


def record_dispatch_failure(task_name: str, queue: str, outcome: str) -> None:
    """Count a dispatch the broker did not take (``raised``, ``deferred`` or ``lost``)."""
    task_metrics().dispatch_failures.labels(task_name, queue, outcome).inc()


def breaker_state_changed(name: str, state: str) -> None:
    task_metrics().breaker_state.labels(name).set(BREAKER_STATES.get(state, -1))
