"""The project's Alembic migrations, run the way a user runs them.

``alembic_command`` runs ``alembic ...`` in a process of its own (the
environment's ``DATABASE_URL`` picks the database, as for a user);
``upgrade`` runs ``alembic upgrade`` in this process on a connection of its
own (fast, for fixtures); ``schema_differences`` runs autogenerate's
comparison in a fresh process, where ``Base.metadata`` holds only the
application's and the framework's tables (this process's also holds the
tests' own).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import create_async_engine

ROOT = Path(__file__).resolve().parents[2]
ALEMBIC = Path(sys.executable).parent / "alembic"

_COMPARE = """
import asyncio, json, os
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

import app.models  # noqa: F401
from app.core.background.database import include_name
from app.core.database import Base

def compare(connection):
    context = MigrationContext.configure(
        connection, opts={"include_name": include_name, "compare_type": True}
    )
    return [repr(diff) for diff in compare_metadata(context, Base.metadata)]

async def main():
    engine = create_async_engine(os.environ["DATABASE_URL"])
    async with engine.connect() as connection:
        print(json.dumps(await connection.run_sync(compare)))
    await engine.dispose()

asyncio.run(main())
"""


def alembic_command(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``alembic ARGS`` from the project's root, on ``database_url``."""
    return subprocess.run(
        [str(ALEMBIC), *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )


def upgrade(database_url: str, revision: str = "head") -> None:
    """``alembic upgrade REVISION`` on ``database_url``, in this process."""

    async def run() -> None:
        engine = create_async_engine(database_url)
        try:
            async with engine.begin() as connection:
                await connection.run_sync(_upgrade, revision)
        finally:
            await engine.dispose()

    asyncio.run(run())


def _upgrade(connection: object, revision: str) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def schema_differences(database_url: str) -> list[str]:
    """What ``alembic revision --autogenerate`` would write for ``database_url`` (empty: none)."""
    result = subprocess.run(
        [sys.executable, "-c", _COMPARE],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return list(json.loads(result.stdout.strip().splitlines()[-1]))
