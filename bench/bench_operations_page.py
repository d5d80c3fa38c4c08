"""How the operations page's dead-letter reads scale: 100,000 rows against an empty table.

    .venv/bin/python bench/bench_operations_page.py [--rows 100000] [--loads 20]

For PostgreSQL (a database of its own, created and dropped here) and the
embedded SQLite default (a temporary file): fills ``background_dead_letters``
with ``--rows`` dead letters over 200 task/error groups and 30 days, then
times what one page load reads (the newest 50, the total count, the groups,
and rendering the HTML) and one dead letter's page, median of ``--loads``,
and prints them next to the same reads of an empty table. The broker reads
(queue depths, running tasks) do not depend on the number of dead letters
and are left out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.core.background.internals.console.page import render_dead_letter, render_overview
from app.core.background.internals.operations.dead_letters import (
    PAGE_SIZE,
    DeadLetterFilter,
    DeadLetterStore,
    dead_letters,
    encode_arguments,
)

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def rows(first: int, count: int, now: float) -> list[dict[str, Any]]:
    arguments, _ = encode_arguments([], {"user_id": 12345, "email": "someone@example.com"})
    return [
        {
            "task_id": f"task-{i:08d}",
            "task_name": f"app.module_{i % 20}.task",
            "queue": "default",
            "reason": "retries exhausted",
            "arguments": arguments,
            "arguments_complete": True,
            "error_type": f"Error{i % 10}",
            "error_module": "app.errors",
            "error_message": f"failure number {i}",
            "traceback": "Traceback (most recent call last):\n  ...\nError: x\n" * 5,
            "attempts": 4,
            "worker": "w1@host",
            "first_failed_at": now - (i % 2_592_000) - 60,
            "last_failed_at": now - (i % 2_592_000),
        }
        for i in range(first, first + count)
    ]


async def fill(engine: AsyncEngine, count: int) -> None:
    store = DeadLetterStore(engine)
    await store.ensure_table()
    now = time.time()
    batch = 5_000
    for start in range(0, count, batch):
        async with engine.begin() as connection:
            filled = rows(start, min(batch, count - start), now)
            await connection.execute(insert(dead_letters), filled)
    # What autovacuum does to a table after 100,000 inserts (statistics, and
    # the visibility map that lets PostgreSQL count from the index alone).
    async with engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        if connection.dialect.name == "postgresql":
            await autocommit.exec_driver_sql(f"VACUUM ANALYZE {dead_letters.name}")
        else:
            await autocommit.exec_driver_sql("ANALYZE")


async def median_ms(action: Callable[[], Awaitable[Any]], loads: int) -> float:
    await action()  # warm: connections, statement caches
    samples = []
    for _ in range(loads):
        start = time.perf_counter()
        await action()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


async def measure(engine: AsyncEngine, loads: int) -> dict[str, float]:
    store = DeadLetterStore(engine)

    async def overview() -> None:
        groups = await store.groups()
        letters, total = await store.page(DeadLetterFilter(), limit=PAGE_SIZE)
        render_overview(
            base="/background", queues={"default": 0}, running=[], no_running_reason="",
            groups=groups, letters=letters, total=total, offset=0, page_size=PAGE_SIZE,
            where=DeadLetterFilter(), message=None,
        )  # fmt: skip

    async def deep_page() -> None:
        await store.page(DeadLetterFilter(), offset=50_000, limit=PAGE_SIZE)

    async def filtered() -> None:
        await store.page(DeadLetterFilter(task_name="app.module_3.task", error_type="Error3"))

    async def one() -> None:
        letter = await store.get("task-00050000") or await store.get("missing")
        if letter is not None:
            render_dead_letter(base="/background", letter=letter, message=None)

    return {
        "overview (groups + newest 50 + count + HTML)": await median_ms(overview, loads),
        "one group, newest 50": await median_ms(filtered, loads),
        "page 1,001 (offset 50,000)": await median_ms(deep_page, loads),
        "one dead letter + HTML": await median_ms(one, loads),
    }


async def run(url: str, count: int, loads: int) -> tuple[dict[str, float], dict[str, float]]:
    engine = create_async_engine(url)
    try:
        await DeadLetterStore(engine).ensure_table()
        empty = await measure(engine, loads)
        await fill(engine, count)
        full = await measure(engine, loads)
    finally:
        await engine.dispose()
    return empty, full


def report(title: str, count: int, empty: dict[str, float], full: dict[str, float]) -> None:
    print(f"\n{title}: ms per read, median (empty table -> {count:,} dead letters)")
    for name in full:
        ratio = full[name] / max(empty[name], 1e-6)
        print(f"  {name:<46} {empty[name]:8.2f} -> {full[name]:8.2f}  ({ratio:.1f}x)")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--loads", type=int, default=20)
    options = parser.parse_args()
    name = f"bgbench_ops_{os.getpid()}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        empty, full = await run(
            f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}", options.rows, options.loads
        )
        report("PostgreSQL", options.rows, empty, full)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    with tempfile.TemporaryDirectory() as folder:
        empty, full = await run(f"sqlite+aiosqlite:///{folder}/ops.db", options.rows, options.loads)
        report("SQLite (the embedded default)", options.rows, empty, full)


if __name__ == "__main__":
    asyncio.run(main())
