"""Trace context that travels with a task where OpenTelemetry's instrumentation does not look.

Celery's instrumentation carries a trace from a publish to the run through
the message's ``traceparent`` header. Some sends happen away from their
caller, and the context must be kept with them:

- an outbox row is sent by the relay, in another process, maybe much later:
  the row keeps the W3C headers of the span that wrote it (``current``), and
  the relay publishes inside that context again (``restored``);
- a retry links to the run of the first attempt, and a replayed dead letter
  to the run that failed: their messages carry that run's ``traceparent`` in
  a header of the framework's (``FIRST_ATTEMPT_HEADER``, ``REPLAY_OF_HEADER``).

This module holds no OpenTelemetry code: tracing installs a ``Propagation``
when it starts (``observability/tracing.py``). Until then every function here
is a no-op that returns nothing, so tracing off costs one ``is None`` test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Final, Protocol

# The message header with the traceparent of a task's first attempt (kept by its retries).
FIRST_ATTEMPT_HEADER: Final = "background_first_attempt"
# The message header with the traceparent of the run a dead letter's replay sends again.
REPLAY_OF_HEADER: Final = "background_replay_of"
# The W3C header that names a span (trace id and span id).
TRACEPARENT: Final = "traceparent"


class Propagation(Protocol):
    """How trace context is read from and restored into this process (OpenTelemetry's)."""

    def current(self) -> dict[str, str]:
        """The W3C headers (``traceparent``, ``tracestate``) of the current span; {} if none."""
        ...

    def restored(self, headers: Mapping[str, str]) -> AbstractContextManager[None]:
        """A block that runs inside the context ``headers`` name (a remote parent)."""
        ...


_active: Propagation | None = None


def install(propagation: Propagation | None) -> None:
    """Use ``propagation`` from now on (None: back to no-ops)."""
    global _active
    _active = propagation


def active() -> bool:
    """Whether tracing runs in this process."""
    return _active is not None


def current() -> dict[str, str]:
    """The trace headers of the current span, to keep with a message sent later ({}: none)."""
    return {} if _active is None else _active.current()


def current_traceparent() -> str | None:
    return current().get(TRACEPARENT) if _active is not None else None


def restored(headers: Mapping[str, str] | None) -> AbstractContextManager[None]:
    """Run a block in the trace context ``headers`` carry (nothing when tracing is off)."""
    if _active is None or not headers or TRACEPARENT not in headers:
        return contextlib.nullcontext()
    return _active.restored(headers)


def trace_headers(headers: Mapping[str, object] | None) -> dict[str, str]:
    """The W3C trace headers among ``headers`` (a message's or a row's)."""
    if not headers:
        return {}
    return {
        name: str(headers[name])
        for name in (TRACEPARENT, "tracestate")
        if isinstance(headers.get(name), str)
    }
