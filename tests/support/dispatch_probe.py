"""A process that dispatches one task against the servers its environment names.

    python -m tests.support.dispatch_probe delay          # notify.delay(...)
    python -m tests.support.dispatch_probe delay_with_id  # the same with a task_id (a lease)
    python -m tests.support.dispatch_probe on_commit      # delay_on_commit + TaskSession.commit()
    python -m tests.support.dispatch_probe on_commit_plain  # the same with a plain AsyncSession
    python -m tests.support.dispatch_probe delay_many  # PROBE_CALLS calls in batches of PROBE_BATCH

It prints one JSON object (the last line of stdout): what the call returned or
raised, how long it took, the framework's dispatch-failure counters, and for
the commit scenarios the rows committed and the outbox's pending task ids.
The app reads its settings at import, so each configuration is a process of
its own (``tests/integration/test_dispatch_failures.py``).

``PROBE_DROP_OUTBOX=1``: the database has no outbox table (the fallback fails).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.core.background import TaskContext, TaskDispatchError, simple_task
from app.core.background.fastapi import TaskSession
from app.core.background.internals.delivery.outbox import outbox_table
from app.core.background.observability import configure_logging

# An argument value that must never reach a log line.
SECRET = "probe-secret-7f3a"


@simple_task(name="probe.notify")
def notify(ctx: TaskContext, order_id: int, secret: str) -> None:
    """Never run here: the probe only dispatches."""


def failures(outcome: str) -> float:
    labels = {"task": "probe.notify", "queue": "default", "outcome": outcome}
    return REGISTRY.get_sample_value("background_dispatch_failures_total", labels) or 0.0


def outcome_of(call: Any) -> dict[str, Any]:
    started = time.monotonic()
    try:
        out: dict[str, Any] = {"returned": call()}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out = {
            "raised": type(exc).__name__,
            "message": str(exc),
            "task_ids": list(getattr(exc, "task_ids", ())),
        }
    out["seconds"] = time.monotonic() - started
    return out


def delay() -> dict[str, Any]:
    return outcome_of(lambda: notify.delay(order_id=1, secret=SECRET).id)


def delay_with_id() -> dict[str, Any]:
    from app.core.background.internals.delivery.dedup import deduplicator

    task_id = f"probe-{time.time_ns()}"
    out = outcome_of(lambda: notify.options(task_id=task_id).delay(order_id=1, secret=SECRET).id)
    out["task_id"] = task_id
    # Who holds the id now: nobody, if a failed send gave its lease back.
    out["lease_holder"] = deduplicator.store.holder(task_id)
    return out


def dispatched() -> float:
    labels = {"task": "probe.notify", "queue": "default"}
    return REGISTRY.get_sample_value("background_tasks_dispatched_total", labels) or 0.0


def delay_many() -> dict[str, Any]:
    """``PROBE_CALLS`` calls, each with ``PROBE_PAYLOAD`` bytes of argument, in batches."""
    calls = int(os.environ.get("PROBE_CALLS", "40"))
    payload = SECRET + "x" * int(os.environ.get("PROBE_PAYLOAD", "0"))
    batch = int(os.environ.get("PROBE_BATCH", "10"))
    sent: list[str] = []

    def call() -> list[str]:
        try:
            results = notify.delay_many(
                [{"order_id": n, "secret": payload} for n in range(calls)], batch_size=batch
            )
        except TaskDispatchError as exc:
            sent.extend(result.id for result in exc.sent)
            raise
        return [result.id for result in results]

    out = outcome_of(call)
    out["sent"] = sent
    out["dispatched"] = dispatched()
    return out


async def on_commit(session_class: type[AsyncSession]) -> dict[str, Any]:
    engine = create_async_engine(os.environ["DATABASE_URL"])
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE probe_orders (id INTEGER PRIMARY KEY)"))
        if not os.environ.get("PROBE_DROP_OUTBOX"):
            await connection.run_sync(outbox_table.create)
    sessions = async_sessionmaker(engine, class_=session_class, expire_on_commit=False)
    task_id = None
    started = time.monotonic()
    async with sessions() as session:
        await session.execute(text("INSERT INTO probe_orders (id) VALUES (1)"))
        task_id = notify.delay_on_commit(session, order_id=1, secret=SECRET).id
        try:
            await session.commit()
            out: dict[str, Any] = {"returned": task_id}
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out = {"raised": type(exc).__name__, "message": str(exc)}
    out["seconds"] = time.monotonic() - started
    out["task_id"] = task_id
    async with engine.connect() as connection:
        orders = await connection.execute(text("SELECT count(*) FROM probe_orders"))
        out["orders"] = orders.scalar()
        if not os.environ.get("PROBE_DROP_OUTBOX"):
            rows = await connection.execute(
                outbox_table.select().where(outbox_table.c.sent_at.is_(None))
            )
            out["outbox"] = [row.task_id for row in rows]
    await engine.dispose()
    return out


def main(scenario: str) -> None:
    configure_logging("json")  # as the API does at start-up
    if scenario == "delay":
        out = delay()
    elif scenario == "delay_with_id":
        out = delay_with_id()
    elif scenario == "delay_many":
        out = delay_many()
    elif scenario == "on_commit":
        out = asyncio.run(on_commit(TaskSession))
    elif scenario == "on_commit_plain":
        out = asyncio.run(on_commit(AsyncSession))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    out["metrics"] = {name: failures(name) for name in ("raised", "deferred", "lost")}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
