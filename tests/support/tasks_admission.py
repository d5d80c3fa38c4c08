"""Tasks of the admission tests (tests/integration/test_admission.py): limited tasks that
record their own runs.

``per_tenant`` writes each run's start and end (wall clock) to PostgreSQL, so
a test computes the most runs of a tenant at once from the runs' own records.
The others record in the worker's broker database, which the test owns.
"""

from __future__ import annotations

import asyncio
import json
import time

from sqlalchemy import text

from app.core.background import TaskContext, db_task, simple_task
from tests.support.tasks import counter

RUNS_TABLE = "admission_runs"
CREATE_RUNS = f"""
CREATE TABLE IF NOT EXISTS {RUNS_TABLE} (
    task_id VARCHAR(64) NOT NULL,
    tenant VARCHAR(64) NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    ended DOUBLE PRECISION NOT NULL,
    attempt INTEGER NOT NULL
)
"""
_INSERT = text(
    f"INSERT INTO {RUNS_TABLE} (task_id, tenant, started, ended, attempt) "
    "VALUES (:task_id, :tenant, :started, :ended, :attempt)"
)


@db_task(
    name="admission.per_tenant",
    retry_policy="no_retry",
    concurrency=3,
    concurrency_key=lambda tenant, **_: tenant,
)
async def per_tenant(ctx: TaskContext, tenant: str, seconds: float) -> None:
    started = time.time()
    await asyncio.sleep(seconds)
    ended = time.time()
    values = {"task_id": ctx.task_id, "tenant": tenant, "started": started, "ended": ended}
    await ctx.session.execute(_INSERT, {**values, "attempt": ctx.attempt})


@simple_task(name="admission.paced", retry_policy="no_retry", rate_limit="100/s")
def paced(ctx: TaskContext, run: str) -> None:
    counter().rpush(f"paced:{run}", time.time())


@simple_task(
    name="admission.pair_per_key",
    retry_policy="no_retry",
    concurrency=2,
    concurrency_key=lambda key, **_: key,
)
async def pair_per_key(ctx: TaskContext, run: str, key: str, seconds: float) -> None:
    """Two of a key at once: its start and end go to the run's list."""
    started = time.time()
    await asyncio.sleep(seconds)
    record = {"key": key, "start": started, "end": time.time(), "task_id": ctx.task_id}
    counter().rpush(f"pairs:{run}", json.dumps(record))


@simple_task(
    name="admission.sync_pair_per_key",
    retry_policy="no_retry",
    concurrency=2,
    concurrency_key=lambda key, **_: key,
)
def sync_pair_per_key(ctx: TaskContext, run: str, key: str, seconds: float) -> None:
    started = time.time()
    time.sleep(seconds)
    record = {"key": key, "start": started, "end": time.time(), "task_id": ctx.task_id}
    counter().rpush(f"pairs:{run}", json.dumps(record))


@simple_task(name="admission.held", retry_policy="standard", concurrency=2)
async def held(ctx: TaskContext, run: str) -> None:
    """Holds its slot until the test says ``release:{run}``; counts its starts and ends."""
    await _hold(ctx, run)


@simple_task(name="admission.one_at_a_time", retry_policy="standard", concurrency=1)
async def one_at_a_time(ctx: TaskContext, run: str) -> None:
    """``held`` with a cap of one."""
    await _hold(ctx, run)


async def _hold(ctx: TaskContext, run: str) -> None:
    redis = counter()
    redis.rpush(f"held-started:{run}", ctx.task_id)
    while not redis.exists(f"release:{run}"):  # noqa: ASYNC110 - set by another process
        await asyncio.sleep(0.05)
    redis.rpush(f"held-done:{run}", ctx.task_id)


@simple_task(
    name="admission.pair_to_file",
    retry_policy="no_retry",
    concurrency=2,
    concurrency_key=lambda key, **_: key,
)
async def pair_to_file(ctx: TaskContext, path: str, key: str, seconds: float) -> None:
    """``pair_per_key`` for a worker without Redis (the embedded default): lines of a file."""
    started = time.time()
    await asyncio.sleep(seconds)
    record = {"key": key, "start": started, "end": time.time(), "task_id": ctx.task_id}
    # One short append per run (whole lines); a blocking write is what the test wants to see.
    with open(path, "a", encoding="utf-8") as runs:  # noqa: ASYNC230
        runs.write(json.dumps(record) + "\n")


@simple_task(
    name="admission.paced_per_key",
    retry_policy="no_retry",
    rate_limit="5/s",
    rate_limit_key=lambda key, **_: key,
)
def paced_per_key(ctx: TaskContext, run: str, key: str) -> None:
    counter().rpush(f"paced:{run}:{key}", time.time())
