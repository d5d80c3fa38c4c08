"""Core tasks of the framework itself."""

from __future__ import annotations

import os
import socket
from typing import Any

from .internals.context import TaskContext
from .internals.decorators import simple_task

__all__ = ("ping",)


@simple_task(name="background.ping", retry_policy="no_retry", queue="high_priority", expires=30)
def ping(ctx: TaskContext) -> dict[str, Any]:
    """Answer from a worker: used by ``/health`` to see that a worker consumes."""
    return ctx.success_result(worker=f"{socket.gethostname()}:{os.getpid()}")
