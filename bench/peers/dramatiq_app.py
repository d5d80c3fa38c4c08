"""dramatiq: ``dramatiq bench.peers.dramatiq_app --processes 2 --threads N``.

Redis broker (a message stays in ``<queue>.msgs`` until its worker
acknowledges it, after the run), async actors through dramatiq's ``AsyncIO``
middleware (one event-loop thread per process; each of the N worker threads
waits for one coroutine), results stored with the ``Results`` middleware on
the same server. Defaults otherwise (prefetch 2 x threads).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware.asyncio import AsyncIO
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend
from sqlalchemy.ext.asyncio import async_sessionmaker

from bench.peers.common import create_engine
from bench.peers.common import pg_sleep as run_pg_sleep

QUEUE = "bench-dramatiq"
NAMESPACE = "dramatiq"

broker = RedisBroker(url=os.environ["BENCH_PEER_REDIS"], namespace=NAMESPACE)
broker.add_middleware(AsyncIO())
broker.add_middleware(Results(backend=RedisBackend(url=os.environ["BENCH_PEER_RESULTS"])))
dramatiq.set_broker(broker)

_sessions: dict[str, Any] = {}


@dramatiq.actor(queue_name=QUEUE, store_results=True)
async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


@dramatiq.actor(queue_name=QUEUE, store_results=True)
async def pg_sleep(seconds: float) -> None:
    # Created on first use, on the process's event-loop thread (no await in between).
    if "factory" not in _sessions:
        _sessions["factory"] = async_sessionmaker(create_engine(), expire_on_commit=False)
    await run_pg_sleep(_sessions["factory"], seconds)


async def enqueue(job: str, seconds: float, count: int) -> None:
    """``actor.send()`` ``count`` times (the workers are paused meanwhile)."""
    actor = sleep if job == "sleep" else pg_sleep
    for _ in range(count):
        actor.send(seconds)


def backlog(client: Any) -> int:
    """Messages enqueued and not yet acknowledged."""
    return int(client.hlen(f"{NAMESPACE}:{QUEUE}.msgs"))
