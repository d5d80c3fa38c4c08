"""Core tasks of the framework itself."""

from __future__ import annotations

import os
import socket
from typing import Any

from celery.schedules import crontab

from .internals.admission.gate import admission
from .internals.context import TaskContext
from .internals.decorators import simple_task
from .internals.delivery.periodic import periodic
from .internals.operations.dead_letters import (
    DEFAULT_RETENTION,
    RETENTION_SETTING,
    DeadLetterStore,
)
from .internals.registry import current_app
from .internals.session import database

__all__ = ("ping", "prune_dead_letters", "prune_limits")


@simple_task(name="background.ping", retry_policy="no_retry", queue="high_priority", expires=30)
def ping(ctx: TaskContext) -> dict[str, Any]:
    """Answer from a worker: used by ``/health`` to see that a worker consumes."""
    return ctx.success_result(worker=f"{socket.gethostname()}:{os.getpid()}")


@periodic(crontab(minute=17, hour=3), period="daily")
@simple_task(name="background.prune_dead_letters", retry_policy="standard", queue="low_priority")
async def prune_dead_letters(ctx: TaskContext) -> dict[str, Any]:
    """Delete the dead letters older than ``BACKGROUND_DEAD_LETTER_RETENTION_DAYS`` (daily)."""
    retention = float(current_app().conf.get(RETENTION_SETTING) or DEFAULT_RETENTION)
    deleted = await DeadLetterStore(database.engine).prune(retention)
    ctx.log_info("Dead letters pruned", deleted=deleted)
    return ctx.success_result(deleted=deleted)


@periodic(crontab(minute=37, hour=3), period="daily")
@simple_task(name="background.prune_limits", retry_policy="standard", queue="low_priority")
def prune_limits(ctx: TaskContext) -> dict[str, Any]:
    """Delete the state of task limits idle for a day (the SQL store; Redis keys expire)."""
    pruned = admission.store.prune()
    ctx.log_info("Idle task limits pruned", scopes=pruned)
    return ctx.success_result(scopes=pruned)
