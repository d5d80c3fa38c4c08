"""What every part of the framework may ask: the Celery app in use, the task names, the headers.

A leaf module: it imports nothing else of the framework, so any module can
ask it without an import cycle (dramatiq's ``get_broker``/``set_broker``). The
app factory (``celery_app.py``) says which app is in use; the decorators ask
for it, and claim task names; logging asks whether a name is a framework task;
the send path and the worker read and write the framework's message headers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

# -- the framework's message headers ------------------------------------------------

# Deduplication: the lease holder's token, the lease lifetime it was sent with,
# and, for a periodic firing, the time (epoch) until which the lease is kept.
TOKEN_HEADER = "background_dedup_token"
TTL_HEADER = "background_dedup_ttl"
KEEP_UNTIL_HEADER = "background_dedup_keep_until"
# Set by a ``@periodic`` beat entry: the period whose key becomes the task id.
PERIOD_HEADER = "background_period"
# Set on a task's first retry: when (epoch) its first attempt failed (dead letters).
FIRST_FAILURE_HEADER = "background_first_failure"
# Set when a run waited for its task's limits: how many times it was sent again
# for that (a deferral is no retry: the attempt count does not move).
DEFERRALS_HEADER = "background_deferrals"


# -- the Celery app -------------------------------------------------------------------

_app: Celery | None = None


def use_app(app: Celery) -> None:
    """Make ``app`` the one the decorators register tasks on (the app factory calls it)."""
    global _app
    _app = app


def current_app() -> Celery:
    """The app tasks are registered on (importing ``app.core.background`` creates it)."""
    if _app is None:
        raise RuntimeError(
            "no Celery app yet: import app.core.background (it builds the app) before "
            "declaring tasks"
        )
    return _app


# -- task names -----------------------------------------------------------------------


class TaskRegistry:
    """Framework tasks by name, to refuse a second task with the same name."""

    def __init__(self) -> None:
        self._functions: dict[str, Callable[..., Any]] = {}

    def claim(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any] | None:
        """Record ``fn`` under ``name`` if it is free (None); else the function that has it."""
        existing = self._functions.get(name)
        if existing is None:
            self._functions[name] = fn
        return existing

    def release(self, name: str) -> None:
        self._functions.pop(name, None)

    def body(self, name: str) -> Callable[..., Any] | None:
        """The function of the framework task ``name`` (None for any other name)."""
        return self._functions.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def __iter__(self) -> Any:
        return iter(sorted(self._functions))


def where(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of a task function, as errors name it."""
    return f"{fn.__module__}.{fn.__qualname__}"


registry = TaskRegistry()
