"""What the peers' workers share: the per-process engine for ``pg_sleep``."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

PG_SLEEP = text("SELECT pg_sleep(:seconds)")


def create_engine() -> AsyncEngine:
    return create_async_engine(
        os.environ["BENCH_DATABASE_URL"],
        pool_size=int(os.environ.get("BENCH_POOL_SIZE", "5")),
        max_overflow=10,
    )


async def pg_sleep(sessions: async_sessionmaker[Any], seconds: float) -> None:
    async with sessions() as session:
        await session.execute(PG_SLEEP, {"seconds": seconds})
        await session.commit()
