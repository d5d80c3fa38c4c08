"""saq: ``python -m saq bench.peers.saq_app.settings --workers 2``.

Redis queue, ``concurrency`` jobs per worker process (``BENCH_PEER_CONCURRENCY``),
saq's defaults otherwise (a job's result kept on its key, job timeout 10 s).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from redis import asyncio as aioredis
from saq.queue.redis import RedisQueue as Queue
from sqlalchemy.ext.asyncio import async_sessionmaker

from bench.peers.common import create_engine
from bench.peers.common import pg_sleep as run_pg_sleep

NAME = "bench-saq"

CONCURRENCY = int(os.environ.get("BENCH_PEER_CONCURRENCY", "10"))


def _queue() -> Queue:
    # Queue.from_url(url) as saq documents it, but with a connection pool that
    # fits the concurrency: redis-py 6+ caps an asyncio pool at 100
    # connections, and each waiting dequeue holds one. At concurrency 100 the
    # cap was reached: a job's finish failed with MaxConnectionsError and the
    # job stayed "active" for good (a 2,000-task drain never ended).
    client = aioredis.from_url(os.environ["BENCH_PEER_REDIS"], max_connections=CONCURRENCY + 50)
    return Queue(client, name=NAME)


queue = _queue()


async def startup(ctx: dict[str, Any]) -> None:
    if "BENCH_DATABASE_URL" in os.environ:
        ctx["engine"] = engine = create_engine()
        ctx["sessions"] = async_sessionmaker(engine, expire_on_commit=False)


async def shutdown(ctx: dict[str, Any]) -> None:
    if "engine" in ctx:
        await ctx["engine"].dispose()


async def sleep(ctx: dict[str, Any], *, seconds: float) -> None:
    await asyncio.sleep(seconds)


async def pg_sleep(ctx: dict[str, Any], *, seconds: float) -> None:
    await run_pg_sleep(ctx["sessions"], seconds)


settings = {
    "queue": queue,
    "functions": [sleep, pg_sleep],
    "concurrency": CONCURRENCY,
    "startup": startup,
    "shutdown": shutdown,
}


async def enqueue(job: str, seconds: float, count: int) -> None:
    """``queue.enqueue()`` ``count`` times (the workers are paused meanwhile)."""
    # A queue of its own: disconnect() closes its Redis client for good.
    client = _queue()
    await client.connect()
    try:
        for start in range(0, count, 200):
            await asyncio.gather(
                *(client.enqueue(job, seconds=seconds) for _ in range(min(200, count - start)))
            )
    finally:
        await client.disconnect()


def backlog(client: Any) -> int:
    """Jobs queued plus jobs taken and not finished."""
    return int(client.llen(f"saq:{NAME}:queued")) + int(client.llen(f"saq:{NAME}:active"))
