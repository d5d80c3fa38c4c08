"""Benchmark: bulk updates with ``iter_batches`` + ``commit_batch`` on a real worker.

Run: ``.venv/bin/python bench/bench_batches.py [--rows 200000] [--small 50000]``

Prints (figures, not assertions):

1. rows/s of ``entities.bulk_mark_processed`` (the example task: keyset id
   pages -> ``iter_batches`` with ``get_many`` -> update -> ``commit_batch``,
   batch size 500) run by a prefork worker with one pool child, against a
   hand-written SQLAlchemy async loop doing the same updates in this process
   (target: ratio >= 0.8);
2. peak RSS (``VmHWM`` of the pool child) after processing the small and the
   large table, each in a fresh worker (target: growth < 30%).

Uses its own PostgreSQL database (created and dropped here) and db 15 of a
private ``redis-server`` started on a free port (other benchmarks use db 15 of
the shared Redis at the same time: a shared broker would hand their messages
to this worker). ``BENCH_REDIS_URL`` uses an existing Redis instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PG_ADMIN = os.environ.get("BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


PRIVATE_REDIS_PORT = None if os.environ.get("BENCH_REDIS_URL") else free_port()
REDIS_URL = os.environ.get("BENCH_REDIS_URL") or f"redis://127.0.0.1:{PRIVATE_REDIS_PORT}/15"
DB_NAME = f"bgbench_batches_{os.getpid()}_{uuid.uuid4().hex[:6]}"
PG_URL = (
    PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + "/" + DB_NAME
)
BATCH_SIZE = 500

# The app reads its settings on import: point it at the bench's services first.
os.environ.update(
    DATABASE_URL=PG_URL,
    CELERY_BROKER_URL=REDIS_URL,
    CELERY_RESULT_BACKEND=REDIS_URL,
    DATABASE_CREATE_TABLES="false",
    LOG_FORMAT="json",
)

import asyncpg  # noqa: E402
import redis  # noqa: E402


async def admin(statement: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def create_schema() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    import app.models  # noqa: F401 - registers the tables
    from app.core.database import Base

    engine = create_async_engine(PG_URL)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    await engine.dispose()


async def seed(rows: int) -> None:
    """Exactly ``rows`` fresh entities, vacuumed and analysed."""
    connection = await asyncpg.connect(PG_ADMIN.rsplit("/", 1)[0] + "/" + DB_NAME)
    try:
        await connection.execute("TRUNCATE entities")
        await connection.execute(
            "INSERT INTO entities (id, name, status, processed_count) "
            "SELECT gen_random_uuid(), 'entity-' || g, 'new', 0 FROM generate_series(1, $1) g",
            rows,
        )
        await connection.execute("VACUUM ANALYZE entities")
    finally:
        await connection.close()


async def count_processed() -> int:
    connection = await asyncpg.connect(PG_ADMIN.rsplit("/", 1)[0] + "/" + DB_NAME)
    try:
        return int(
            await connection.fetchval("SELECT count(*) FROM entities WHERE status = 'processed'")
        )
    finally:
        await connection.close()


async def hand_written_loop() -> int:
    """What one would write without the framework: same engine settings, same updates."""
    from sqlalchemy import select
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from app.core.background.database import DatabaseConfig, create_database_engine
    from app.entities.models import PROCESSED, Entity

    engine = create_database_engine(DatabaseConfig(url=PG_URL))
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    done = 0
    now = datetime.now(UTC)
    try:
        async with sessions() as session:
            last: uuid.UUID | None = None
            while True:
                query = select(Entity).where(Entity.status != PROCESSED)
                if last is not None:
                    query = query.where(Entity.id > last)
                page = (await session.scalars(query.order_by(Entity.id).limit(BATCH_SIZE))).all()
                if not page:
                    break
                for entity in page:
                    entity.status = PROCESSED
                    entity.processed_count += 1
                    entity.processed_at = now
                last = page[-1].id
                done += len(page)
                await session.commit()
                session.expunge_all()
    finally:
        await engine.dispose()
    return done


async def task_body_in_process() -> int:
    """The example task's body with a plain ``TaskContext``: the framework without the worker."""
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from app.core.background import TaskContext
    from app.core.background.database import DatabaseConfig, create_database_engine
    from app.entities.tasks import bulk_mark_processed

    engine = create_database_engine(DatabaseConfig(url=PG_URL))
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:
        async with sessions() as session:
            ctx = TaskContext("bench", "entities.bulk_mark_processed", session=session)
            result = await bulk_mark_processed(ctx, batch_size=BATCH_SIZE)
    finally:
        await engine.dispose()
    return int(result["processed"])


def timed_in_process(loop: Callable[[], Coroutine[Any, Any, int]], rows: int) -> float:
    """rows/s of one in-process run over a freshly seeded table."""
    asyncio.run(seed(rows))
    started = time.perf_counter()
    done = asyncio.run(loop())
    elapsed = time.perf_counter() - started
    assert done == rows == asyncio.run(count_processed()), done
    return rows / elapsed


def pool_children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(c) for c in text)
    return children


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run_on_worker(rows: int) -> tuple[float, int, int, dict[str, object]]:
    """Seconds, child VmRSS before (kB), child VmHWM after (kB), result: fresh worker."""
    from app.core.background.internals.operations.worker_process import WorkerProcess
    from app.entities.tasks import bulk_mark_processed

    asyncio.run(seed(rows))
    with WorkerProcess({}, concurrency=1) as worker:
        children = pool_children(worker.pid)
        before = sum(status_kb(c, "VmRSS") for c in children)
        started = time.perf_counter()
        result = bulk_mark_processed.apply_async(kwargs={"batch_size": BATCH_SIZE})
        outcome = result.get(timeout=1800)
        elapsed = time.perf_counter() - started
        peak = sum(status_kb(c, "VmHWM") for c in pool_children(worker.pid))
    return elapsed, before, peak, outcome


def start_private_redis() -> subprocess.Popen[bytes] | None:
    if PRIVATE_REDIS_PORT is None:
        return None
    server = subprocess.Popen(
        ["redis-server", "--port", str(PRIVATE_REDIS_PORT), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis.from_url(REDIS_URL)
    for _ in range(100):
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            time.sleep(0.05)
    server.terminate()
    raise RuntimeError("the private redis-server did not start")


def measure(args: argparse.Namespace) -> None:
    rows, small = args.rows, args.small
    hand_rates: list[float] = []
    body_rates: list[float] = []
    worker_rates: list[float] = []
    big_peaks: list[int] = []
    small_peaks: list[int] = []
    # Alternate the two sides so that a noisy neighbour hurts both alike; keep the best.
    for round_ in range(1, args.rounds + 1):
        hand_rates.append(timed_in_process(hand_written_loop, rows))
        body_rates.append(timed_in_process(task_body_in_process, rows))

        big, big_before, big_peak, outcome = run_on_worker(rows)
        assert outcome["processed"] == rows, outcome
        assert asyncio.run(count_processed()) == rows
        worker_rates.append(rows / big)
        big_peaks.append(big_peak)

        _, _, small_peak, outcome = run_on_worker(small)
        assert outcome["processed"] == small, outcome
        small_peaks.append(small_peak)
        print(f"round {round_}: hand-written {hand_rates[-1]:8.0f} rows/s | "
              f"task body in process {body_rates[-1]:8.0f} rows/s | "
              f"worker {worker_rates[-1]:8.0f} rows/s ({rows} rows, send to result) | "
              f"child VmRSS ready {big_before / 1024:.1f} MiB, "
              f"VmHWM {small}: {small_peak / 1024:.1f} MiB, "
              f"{rows}: {big_peak / 1024:.1f} MiB")  # fmt: skip

    best_hand, best_body, best_worker = max(hand_rates), max(body_rates), max(worker_rates)
    small_peak, big_peak = min(small_peaks), max(big_peaks)
    growth = 100.0 * (big_peak - small_peak) / small_peak
    print()
    print(f"hand-written SQLAlchemy loop, in process: {best_hand:8.0f} rows/s (best)")
    print(f"same task body in process (no worker):    {best_body:8.0f} rows/s (best)"
          f"   ratio {best_body / best_hand:.2f}")  # fmt: skip
    print(f"iter_batches + update + commit_batch, worker: {best_worker:8.0f} rows/s (best)"
          f"   ratio {best_worker / best_hand:.2f}   (target >= 0.80)")  # fmt: skip
    ratios = [w / h for w, h in zip(worker_rates, hand_rates, strict=True)]
    print(f"  worker / hand-written, round by round: {', '.join(f'{r:.2f}' for r in ratios)}"
          f"   (median {statistics.median(ratios):.2f})")  # fmt: skip
    print(f"pool child peak RSS (VmHWM): {small} rows {small_peak / 1024:.1f} MiB (lowest), "
          f"{rows} rows {big_peak / 1024:.1f} MiB (highest)")  # fmt: skip
    print(f"  growth: {growth:+.1f}%   (target < 30%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--small", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    private = start_private_redis()
    backend = redis.Redis.from_url(REDIS_URL)
    try:
        backend.flushdb()
        asyncio.run(admin(f'CREATE DATABASE "{DB_NAME}"'))
        asyncio.run(create_schema())
        print(f"PostgreSQL database {DB_NAME}, Redis {REDIS_URL}, batch size {BATCH_SIZE}, "
              f"worker: prefork, one pool child")  # fmt: skip
        measure(args)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
        backend.flushdb()
        if private is not None:
            private.terminate()
            private.wait(10)


if __name__ == "__main__":
    main()
