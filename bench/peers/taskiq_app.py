"""taskiq: ``taskiq worker bench.peers.taskiq_app:broker --workers 2 --max-async-tasks N``.

RedisStreamBroker (consumer group, messages acknowledged after the result is
saved: taskiq's default ``--ack-type when_saved``) with taskiq-redis's result
backend on the same server.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from sqlalchemy.ext.asyncio import async_sessionmaker
from taskiq import TaskiqEvents, TaskiqState
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from bench.peers.common import create_engine
from bench.peers.common import pg_sleep as run_pg_sleep

QUEUE = "bench-taskiq"
GROUP = "taskiq"

broker = RedisStreamBroker(
    url=os.environ["BENCH_PEER_REDIS"], queue_name=QUEUE, consumer_group_name=GROUP
).with_result_backend(RedisAsyncResultBackend(os.environ["BENCH_PEER_RESULTS"]))

_sessions: dict[str, Any] = {}


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def startup(state: TaskiqState) -> None:
    if "BENCH_DATABASE_URL" in os.environ:
        engine = create_engine()
        _sessions["engine"] = engine
        _sessions["factory"] = async_sessionmaker(engine, expire_on_commit=False)


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def shutdown(state: TaskiqState) -> None:
    if "engine" in _sessions:
        await _sessions["engine"].dispose()


@broker.task(task_name="sleep")
async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


@broker.task(task_name="pg_sleep")
async def pg_sleep(seconds: float) -> None:
    await run_pg_sleep(_sessions["factory"], seconds)


async def enqueue(job: str, seconds: float, count: int) -> None:
    """``task.kiq()`` ``count`` times (the workers are paused meanwhile)."""
    task = sleep if job == "sleep" else pg_sleep
    await broker.startup()
    try:
        for start in range(0, count, 200):
            await asyncio.gather(*(task.kiq(seconds) for _ in range(min(200, count - start))))
    finally:
        await broker.shutdown()


def backlog(client: Any) -> int:
    """Messages not yet delivered (lag) plus delivered and not acknowledged (pending)."""
    for group in client.xinfo_groups(QUEUE):
        if group["name"] in (GROUP, GROUP.encode()):
            return int(group["lag"] or 0) + int(group["pending"])
    return 0
