"""Tasks for the logging, metrics and circuit breaker tests (issue 6)."""

from __future__ import annotations

import os
import time
from functools import cache
from typing import Any

import redis

from app.core.background import (
    TaskContext,
    TaskNotFoundError,
    TaskValidationError,
    db_task,
    simple_task,
)
from app.core.background.extras import CircuitBreaker


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])


@simple_task(name="obs.ok")
def ok(ctx: TaskContext, n: int, secret: str = "") -> dict[str, Any]:
    ctx.log_info("Working", n=n)
    return ctx.success_result(n=n, echoed_secret=secret)


@simple_task(name="obs.fail", retry_policy="no_retry")
def fail(ctx: TaskContext, secret: str = "") -> None:
    raise TaskValidationError("bad input on purpose")


@simple_task(name="obs.bad_uuid")
def bad_uuid(ctx: TaskContext, entity_id: str) -> None:
    """Given a value that is not a UUID (the tests pass a secret): fails validation."""
    ctx.validate_uuid(entity_id, "entity_id")


@simple_task(name="obs.missing")
def missing(ctx: TaskContext, key: str) -> None:
    raise TaskNotFoundError("Record not found")


@db_task(name="obs.duplicate")
async def duplicate(ctx: TaskContext, key: str) -> None:
    """Inserts ``key`` twice: a constraint violation whose SQL parameters hold the argument."""
    from tests.support.models import Record

    ctx.session.add(Record(key=key))
    await ctx.session.flush()
    ctx.session.add(Record(key=key))
    await ctx.session.flush()


@simple_task(name="obs.flaky")
def flaky(ctx: TaskContext, key: str) -> str:
    """Fails on its first attempt, succeeds on the second."""
    if int(_redis().incr(f"obs:flaky:{key}")) == 1:
        raise ConnectionError("service hiccup")
    return "ok"


@simple_task(name="obs.guarded", retry_policy="aggressive")
def guarded(ctx: TaskContext, key: str, failures: int) -> str:
    """Calls a 'service' through a shared breaker; the service fails ``failures`` times."""
    breaker = CircuitBreaker(
        name=f"obs-{key}", failure_threshold=1, recovery_timeout=0.5, redis=_redis()
    )

    def service() -> str:
        if int(_redis().incr(f"obs:guarded:{key}")) <= failures:
            raise ConnectionError("service down")
        return "ok"

    return breaker.call(service)


@simple_task(name="obs.rendezvous")
def rendezvous(ctx: TaskContext, key: str, parties: int) -> int:
    """Returns once ``parties`` runs are inside at the same time: proves they ran in parallel."""
    client = _redis()
    client.incr(f"obs:rendezvous:{key}")
    for _ in range(2000):
        if int(client.get(f"obs:rendezvous:{key}") or 0) >= parties:
            return os.getpid()
        time.sleep(0.005)
    raise TimeoutError("the other runs never arrived")
