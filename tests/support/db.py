"""Plain queries against the test database from a separate connection."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from tests.support.services import Services


def fetchval(services: Services, query: str, *args: Any) -> Any:
    async def run() -> Any:
        connection = await asyncpg.connect(services.postgres_dsn)
        try:
            return await connection.fetchval(query, *args)
        finally:
            await connection.close()

    return asyncio.run(run())


def fetchrow(services: Services, query: str, *args: Any) -> dict[str, Any] | None:
    async def run() -> dict[str, Any] | None:
        connection = await asyncpg.connect(services.postgres_dsn)
        try:
            row = await connection.fetchrow(query, *args)
            return None if row is None else dict(row)
        finally:
            await connection.close()

    return asyncio.run(run())
