"""Measuring what tasks do: durations and counters."""

from __future__ import annotations

import time
from types import TracebackType


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
