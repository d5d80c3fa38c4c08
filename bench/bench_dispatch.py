"""Cost per dispatch: plain ``.delay()`` vs dispatch after commit vs the transactional outbox.

Run: ``.venv/bin/python bench/bench_dispatch.py [N]`` (Redis db 14 as broker and
result backend, a private PostgreSQL database, no worker: messages are only
published, then flushed). Each variant runs N transactions that insert one row;
the table shows the time per transaction and the extra over the bare commit.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

REDIS_URL = "redis://127.0.0.1:6379/14"
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_NAME = f"bench_dispatch_{os.getpid()}"

# Before the app is imported: it reads its settings once.
os.environ.update(
    CELERY_BROKER_URL=REDIS_URL,
    CELERY_RESULT_BACKEND=REDIS_URL,
    DATABASE_URL=f"postgresql+asyncpg://postgres@127.0.0.1:5432/{DB_NAME}",
    LOG_LEVEL="WARNING",
)


async def admin(sql: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(ADMIN_DSN)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def run(n: int) -> None:
    import anyio
    import redis
    from celery import signals
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from app.core.background import celery_app
    from app.core.background.celery_app import record_sent
    from app.core.background.fastapi import TaskSession
    from app.core.background.outbox import relay_outbox
    from app.core.config import get_settings
    from app.core.engine import create_tables, engine_from_settings
    from app.entities.models import Entity
    from app.entities.tasks import process_entity

    engine = engine_from_settings(get_settings())
    await create_tables(engine)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    task_sessions = async_sessionmaker(engine, class_=TaskSession, expire_on_commit=False)

    async def bare() -> None:
        async with sessions() as session:
            session.add(Entity(name="bench"))
            await session.commit()

    async def plain_on_loop() -> None:
        async with sessions() as session:
            entity = Entity(id=uuid.uuid4(), name="bench")
            session.add(entity)
            await session.commit()
            process_entity.delay(entity_id=str(entity.id))  # blocks the loop

    async def plain_in_thread() -> None:
        async with sessions() as session:
            entity = Entity(id=uuid.uuid4(), name="bench")
            session.add(entity)
            await session.commit()
            await anyio.to_thread.run_sync(lambda: process_entity.delay(entity_id=str(entity.id)))

    async def after_commit() -> None:
        async with task_sessions() as session:
            entity = Entity(id=uuid.uuid4(), name="bench")
            session.add(entity)
            process_entity.delay_on_commit(session, entity_id=str(entity.id))
            await session.commit()

    async def outbox() -> None:
        async with sessions() as session:
            entity = Entity(id=uuid.uuid4(), name="bench")
            session.add(entity)
            process_entity.delay_via_outbox(session, entity_id=str(entity.id))
            await session.commit()

    async def plain_no_marker() -> None:
        signals.before_task_publish.disconnect(record_sent)
        try:
            await plain_on_loop()
        finally:
            signals.before_task_publish.connect(record_sent)

    variants: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("commit only (baseline)", bare),
        ("commit + .delay() on the loop, no SENT marker", plain_no_marker),
        ("commit + .delay() on the loop", plain_on_loop),
        ("commit + .delay() in a thread", plain_in_thread),
        ("delay_on_commit (TaskSession)", after_commit),
        ("delay_via_outbox (write only)", outbox),
    ]
    for _, fn in variants:  # warm-up: connections, pools, threads
        for _ in range(20):
            await fn()
    # Interleaved, so that a busy moment of the machine hits every variant alike.
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(n):
        for name, fn in variants:
            start = time.perf_counter()
            await fn()
            times[name].append(time.perf_counter() - start)
    rows = list(times.items())

    start = time.perf_counter()
    relayed = 0
    while sent := await relay_outbox(sessions, celery_app, batch_size=100):
        relayed += sent
    relay_each = (time.perf_counter() - start) / max(relayed, 1)

    base = statistics.median(rows[0][1])
    print(f"\n{n} transactions each; PostgreSQL + Redis on localhost; times per transaction\n")
    print(f"{'variant':48} {'p50 ms':>8} {'p99 ms':>8} {'extra p50':>10}")
    for name, times in rows:
        times.sort()
        p50, p99 = statistics.median(times), times[int(len(times) * 0.99) - 1]
        print(f"{name:48} {p50 * 1e3:8.3f} {p99 * 1e3:8.3f} {(p50 - base) * 1e3:+10.3f}")
    print(f"{'outbox relay, per row (batches of 100)':48} {relay_each * 1e3:8.3f}")
    print(f"\nrelayed {relayed} outbox rows")
    await engine.dispose()
    redis.Redis.from_url(REDIS_URL).flushdb()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    asyncio.run(admin(f'CREATE DATABASE "{DB_NAME}"'))
    try:
        asyncio.run(run(n))
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
