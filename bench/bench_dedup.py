"""Dispatch cost of task deduplication, per call, against a plain ``.delay()``.

    .venv/bin/python bench/bench_dedup.py [--rounds 9] [--calls 300]

Uses Redis database 15 (or 14 when 15 is claimed) on 127.0.0.1:6379 as broker,
result backend and Redis lease store, and a temporary SQLite file for the
database lease store. No worker runs: only the producer side is measured.
Prints the median over rounds of the mean time per call, in microseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import timeit
import uuid
from collections.abc import Callable
from typing import Any

import redis

HOST, PORT = "127.0.0.1", 6379
TOKEN = uuid.uuid4().hex


def claim_db() -> int:
    admin = redis.Redis(host=HOST, port=PORT, db=0)
    for db in (15, 14):
        if admin.set(f"bgbench:claim:{db}", TOKEN, nx=True, ex=3600):
            return db
    raise SystemExit("Redis databases 14 and 15 are both claimed by another benchmark")


def release_db(db: int) -> None:
    redis.Redis(host=HOST, port=PORT, db=db).flushdb()
    admin = redis.Redis(host=HOST, port=PORT, db=0)
    if admin.get(f"bgbench:claim:{db}") == TOKEN.encode():
        admin.delete(f"bgbench:claim:{db}")


def interleaved(
    scenarios: dict[str, Callable[[int], Any]], calls: int, rounds: int
) -> dict[str, float]:
    """Median over ``rounds`` of the mean seconds per call, scenarios taking turns.

    Taking turns within each round spreads the machine's background noise
    over every scenario instead of penalising whichever ran at a busy moment.
    """
    samples: dict[str, list[float]] = {name: [] for name in scenarios}
    for fn in scenarios.values():
        fn(0)  # warm up connections and scripts
    for r in range(rounds):
        for name, fn in scenarios.items():
            start = time.perf_counter()
            for i in range(calls):
                fn(r * calls + i + 1)
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=300)
    options = parser.parse_args()

    db = claim_db()
    url = f"redis://{HOST}:{PORT}/{db}"
    folder = tempfile.mkdtemp(prefix="bench-dedup-")
    os.environ.update(
        CELERY_BROKER_URL=url,
        CELERY_RESULT_BACKEND=url,
        DATABASE_URL=f"sqlite+aiosqlite:///{folder}/app.db",
        BACKGROUND_DEDUP_BACKEND="redis",
        LOG_LEVEL="WARNING",
    )
    redis.Redis.from_url(url).flushdb()
    try:
        run(url, folder, options.calls, options.rounds)
    finally:
        release_db(db)


def run(url: str, folder: str, calls: int, rounds: int) -> None:
    from celery import Task

    from app.core.background import simple_task
    from app.core.background.internals.delivery.dedup import deduplicator
    from app.core.background.internals.delivery.lease_stores import (
        DatabaseLeaseStore,
        RedisLeaseStore,
    )

    @simple_task(name="bench.dedup.noop")
    def noop(ctx: Any, n: int) -> None: ...

    prefix = uuid.uuid4().hex
    redis_store = RedisLeaseStore(url)
    sqlite_store = DatabaseLeaseStore(f"sqlite+aiosqlite:///{folder}/leases.db")

    def celery_only(n: int) -> None:
        # Celery's own apply_async, without the framework's checks: the baseline.
        Task.apply_async(noop, (n,))

    def plain(n: int) -> None:
        noop.delay(n)

    def unique(n: int) -> None:
        noop.apply_async((n,), task_id=f"{prefix}-{n}")

    def duplicate(n: int) -> None:
        noop.apply_async((n,), task_id=f"{prefix}-held")

    def unique_sqlite(n: int) -> None:
        deduplicator.use_store(sqlite_store)
        try:
            noop.apply_async((n,), task_id=f"{prefix}-sqlite-{n}")
        finally:
            deduplicator.use_store(redis_store)

    def duplicate_sqlite(n: int) -> None:
        deduplicator.use_store(sqlite_store)
        try:
            noop.apply_async((n,), task_id=f"{prefix}-sqlite-held")
        finally:
            deduplicator.use_store(redis_store)

    deduplicator.use_store(redis_store)
    figures = interleaved(
        {
            "celery Task.apply_async (baseline)": celery_only,
            "plain .delay()": plain,
            "task_id, Redis lease, sent": unique,
            "task_id, Redis lease, deduplicated": duplicate,
            "task_id, SQLite lease, sent": unique_sqlite,
            "task_id, SQLite lease, deduplicated": duplicate_sqlite,
        },
        calls,
        rounds,
    )
    sqlite_store.close()

    base = figures["plain .delay()"]
    print(f"dispatch cost per call (median of {rounds} rounds x {calls} calls)")
    for name, seconds in figures.items():
        print(f"  {name:40s} {seconds * 1e6:9.1f} us   {seconds / base:5.2f}x plain .delay()")
    # What a call without task_id pays for this feature: the one test in
    # BaseTask.apply_async that sends it past the deduplicator.
    check = timeit.repeat(
        "is_deduplicated(task_id, options)",
        setup="from app.core.background.internals.delivery.dedup import is_deduplicated; "
        "task_id = None; options = {'queue': 'default'}",
        number=1_000_000,
        repeat=rounds,
    )
    print(
        f"  {'dedup check on a call without task_id':40s} {statistics.median(check) * 1e3:9.1f} ns"
    )


if __name__ == "__main__":
    main()
