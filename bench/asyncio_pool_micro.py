"""The pool mechanism alone, no broker: ``python -m bench.asyncio_pool_micro``.

N jobs, at most C at once, each a target that runs one coroutine awaiting
``asyncio.sleep(SECONDS)`` through ``worker_loop.run`` (what ``runner.execute``
does), handed over as Celery's consumer does (``pool.apply_async`` with
callbacks). Compares the asyncio pool with Celery's ``threads`` pool (a thread
per running task, the coroutine on ``worker_loop``'s daemon thread): CPU per
job (process time) is the pool's own cost, without Celery's tracer, the
broker or the result backend.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from typing import Any

from celery.concurrency.thread import TaskPool as ThreadsPool

from app.core.background.internals.event_loop import worker_loop
from app.core.background.pool import AsyncioPool


class _Task:
    is_async = True


class _App:
    tasks: dict[str, Any] = {"job": _Task()}  # noqa: RUF012
    conf: dict[str, Any] = {}  # noqa: RUF012


def _target(name: str, seconds: float) -> float:
    async def body() -> float:
        await asyncio.sleep(seconds)
        return seconds

    return worker_loop.run(body())


def run(pool: Any, jobs: int, concurrency: int, seconds: float) -> tuple[float, float]:
    slots = threading.BoundedSemaphore(concurrency)
    finished = threading.Event()
    done = [0]
    lock = threading.Lock()

    def callback(_result: Any) -> None:
        slots.release()
        with lock:
            done[0] += 1
            if done[0] == jobs:
                finished.set()

    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(jobs):
        slots.acquire()
        pool.apply_async(
            _target, args=("job", seconds), callback=callback, accept_callback=lambda *_: None
        )
    finished.wait()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.asyncio_pool_micro")
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=0.01)
    args = parser.parse_args()
    for name, make in (
        ("asyncio pool", lambda: AsyncioPool(args.concurrency, app=_App())),
        ("threads pool", lambda: ThreadsPool(args.concurrency)),
    ):
        pool = make()
        pool.start()
        run(pool, 500, args.concurrency, args.seconds)  # warm up (threads, loop)
        wall, cpu = run(pool, args.jobs, args.concurrency, args.seconds)
        pool.stop()
        worker_loop.stop()
        ceiling = args.concurrency / args.seconds
        print(
            f"{name}: {args.jobs / wall:.0f} jobs/s (ceiling {ceiling:.0f}), "
            f"{cpu / args.jobs * 1e6:.0f} µs CPU per job"
        )


if __name__ == "__main__":
    main()
