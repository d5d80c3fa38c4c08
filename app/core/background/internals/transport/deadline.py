"""The deadline of the dispatch running on this thread (see ``publish.py``).

A module of its own, with no imports from the framework, because both the
publisher and the result backend (which ``publish.py`` imports through
``status.py``) ask it whether to retry once more.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# Monotonic time after which no retry of the current dispatch starts.
_deadline: ContextVar[float | None] = ContextVar("background_dispatch_deadline", default=None)


def past_deadline() -> bool:
    """Whether the dispatch running on this thread has used up its time."""
    deadline = _deadline.get()
    return deadline is not None and time.monotonic() >= deadline


def stop_after_deadline(exc: BaseException, interval: float) -> None:
    """kombu's retry errback (``task_publish_retry_policy``): give up once the time is up."""
    if past_deadline():
        raise exc


@contextmanager
def deadline_in(seconds: float) -> Iterator[bool]:
    """Start a deadline unless one runs already; yields whether this block owns it."""
    if _deadline.get() is not None:
        yield False
        return
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield True
    finally:
        _deadline.reset(token)
