"""Tasks of the asyncio pool's tests (tests/integration/test_asyncio_pool.py).

Each records what a test needs to see from the run itself: when it started and
ended (wall clock, so that a test shows that runs overlapped from their own
records rather than from a timing threshold), which process and thread ran
it, which task id it saw. Starts and completions are counted in the worker's
broker database (``counter()``), which the test owns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid
from typing import Any

from celery import current_task
from sqlalchemy import text

from app.core.background import TaskContext, db_task, simple_task
from app.core.background.extras import CircuitBreaker, CircuitBreakerOpen
from app.core.background.internals.session import database
from tests.support.models import Record
from tests.support.tasks import count, counter

_plain = logging.getLogger("tests.asyncio_pool.plain")

# The longest a gated task waits for its gate (a test opens it well before).
GATE_TIMEOUT = 60.0
GATE_POLL = 0.05


def _identity(ctx: TaskContext) -> dict[str, Any]:
    request = current_task.request if current_task else None
    return {
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "ctx_task_id": ctx.task_id,
        # Celery's own (greenlet-local) request, read inside the body.
        "celery_task_id": getattr(request, "id", None),
    }


@simple_task(name="pool.sleep", retry_policy="no_retry")
async def sleep(ctx: TaskContext, key: str, seconds: float, ticks: int = 1) -> dict[str, Any]:
    """Await ``seconds`` in ``ticks`` steps, logging a plain line (no fields) at each."""
    start = time.time()
    identity = _identity(ctx)
    for tick in range(ticks):
        _plain.info("tick %s of %s", tick, key)
        await asyncio.sleep(seconds / ticks)
    identity_after = _identity(ctx)
    return {"key": key, "start": start, "end": time.time(), **identity, "after": identity_after}


@simple_task(name="pool.sync_sleep", retry_policy="no_retry")
def sync_sleep(ctx: TaskContext, key: str, seconds: float) -> dict[str, Any]:
    """A sync body: the pool runs it in a thread, off the loop."""
    start = time.time()
    time.sleep(seconds)
    return {"key": key, "start": start, "end": time.time(), **_identity(ctx)}


@simple_task(name="pool.block_loop", retry_policy="no_retry")
async def block_loop(ctx: TaskContext, seconds: float) -> None:
    """The mistake the pool reports: a sync wait inside an async body."""
    time.sleep(seconds)  # noqa: ASYNC251 - on purpose


@simple_task(name="pool.mark", retry_policy="standard")
async def mark(ctx: TaskContext, key: str, seconds: float) -> dict[str, Any]:
    """Counts starts and completions (for the crash and shutdown tests)."""
    counter().incr(f"started:{key}")
    await asyncio.sleep(seconds)
    counter().incr(f"completed:{key}")
    return {"key": key, "attempt": ctx.attempt}


@simple_task(name="pool.kill_own_process", retry_policy="long_running")
async def kill_own_process(ctx: TaskContext, key: str) -> None:
    """Counts its run, then kills the whole worker process (SIGKILL): nothing is acknowledged.

    ``long_running``: max_retries 2, so three runs, and the fourth delivery fails.
    """
    counter().incr(f"runs:{key}")
    await asyncio.sleep(0)
    os.kill(os.getpid(), signal.SIGKILL)


@simple_task(name="pool.gated", retry_policy="no_retry")
async def gated(ctx: TaskContext, key: str, gate: str) -> dict[str, Any]:
    """Counts its start, then waits until the test sets ``gate`` (bounded), and counts its end."""
    counter().incr(f"started:{key}")
    for _ in range(int(GATE_TIMEOUT / GATE_POLL)):
        if counter().exists(gate):
            break
        await asyncio.sleep(GATE_POLL)
    counter().incr(f"completed:{key}")
    return {"key": key, "gate_open": bool(counter().exists(gate))}


@simple_task(name="pool.stubborn", retry_policy="no_retry")
async def stubborn(ctx: TaskContext, key: str, seconds: float) -> None:
    """Ignores its soft time limit (swallows the cancellation): only the hard limit ends it."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        counter().incr(f"soft:{key}")
    await asyncio.sleep(seconds)
    counter().incr(f"completed:{key}")


@simple_task(name="pool.fails_twice", retry_policy="aggressive")
async def fails_twice(ctx: TaskContext, key: str) -> dict[str, Any]:
    """Records when each attempt starts; the first two fail with a retriable error."""
    counter().rpush(f"attempts:{key}", time.time())
    await asyncio.sleep(0)
    if ctx.attempt < 2:
        raise ConnectionError(f"attempt {ctx.attempt}")
    return {"key": key, "attempt": ctx.attempt}


@db_task(name="pool.db_hold", retry_policy="aggressive")
async def db_hold(ctx: TaskContext, key: str, seconds: float) -> dict[str, Any]:
    """Holds one of the engine's connections for ``seconds`` (``pg_sleep``)."""
    start = time.time()
    backend = (await ctx.session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    await ctx.session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
    return {
        "key": key,
        "start": start,
        "end": time.time(),
        "backend": backend,
        "attempt": ctx.attempt,
        "pool_size": database.pool_size,
        "pid": os.getpid(),
    }


@db_task(name="pool.write_then_hold", retry_policy="aggressive")
async def write_then_hold(ctx: TaskContext, key: str, seconds: float) -> dict[str, Any]:
    """Writes a row (``{key}:<random>``), holds ``seconds`` in its transaction, then commits."""
    counter().incr(f"started:{key}")
    ctx.session.add(Record(key=f"{key}:{uuid.uuid4().hex}", attempt=ctx.attempt))
    await ctx.session.flush()
    await asyncio.sleep(seconds)
    return ctx.success_result(key=key)


@simple_task(name="pool.fails", retry_policy="no_retry")
async def fails(ctx: TaskContext, key: str) -> None:
    """Fails for good after a short await (the metrics test)."""
    await asyncio.sleep(0.2)
    raise ValueError(f"refused {key}")


# The circuit breakers of this worker process, by name: in its memory, so every
# run of the process shares one (the asyncio pool interleaves them on one loop).
_breakers: dict[str, CircuitBreaker] = {}
BREAKER_THRESHOLD = 3
BREAKER_RECOVERY = 3.0


@simple_task(name="pool.guarded", retry_policy="no_retry")
async def guarded(
    ctx: TaskContext, key: str, breaker: str, fail: bool, seconds: float
) -> dict[str, Any]:
    """Calls a service through the process's breaker ``breaker``: ``ok``, ``failed`` or ``open``.

    The service counts its calls (``executions:{breaker}:calls``), awaits
    ``seconds``, then fails when ``fail``.
    """
    guard = _breakers.setdefault(
        breaker, CircuitBreaker(breaker, BREAKER_THRESHOLD, BREAKER_RECOVERY)
    )

    async def service() -> None:
        count(f"{breaker}:calls")
        await asyncio.sleep(seconds)
        if fail:
            raise ConnectionError("the service is down")

    try:
        await guard.call_async(service)
    except CircuitBreakerOpen:
        return {"key": key, "outcome": "open", "pid": os.getpid()}
    except ConnectionError:
        return {"key": key, "outcome": "failed", "pid": os.getpid()}
    return {"key": key, "outcome": "ok", "pid": os.getpid()}
