"""Deduplication by ``task_id``: the id helpers, and how long an id stays taken.

``task.apply_async(..., task_id=notify_key(user_id))`` runs one task per id at
a time; a second call while the first is queued, waiting for a retry or
running sends nothing and returns the first one's result.
"""

from .internals.delivery.dedup import (
    TaskIdRevokedError,
    args_key,
    daily_key,
    lease_lifetime,
    log_deduplicated,
    notify_key,
    update_key,
)

__all__ = (
    "args_key",
    "daily_key",
    "notify_key",
    "update_key",
    "lease_lifetime",
    "log_deduplicated",
    "TaskIdRevokedError",
)
