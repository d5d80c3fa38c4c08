"""A real ``AsyncSession`` for a task under test, rolled back when the test ends.

SQLAlchemy 2.x's "join a session into an external transaction" recipe: one
connection opens an outer transaction, and the session joins it with
``join_transaction_mode="create_savepoint"``. The task's ``commit()`` (and
``ctx.commit_batch()``) then releases a savepoint instead of committing, its
``rollback()`` goes back to the savepoint, everything is visible through the
same session, and the outer rollback at the end leaves the database as it was.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import Connection, MetaData, Table, event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from .session import database


def create_test_engine(url: str) -> AsyncEngine:
    """An engine for one test: no pool to outlive the test's event loop.

    SQLite's driver manages transactions itself and ignores savepoints unless
    told not to: SQLAlchemy's documented fix (driver autocommit off, ``BEGIN``
    emitted by SQLAlchemy) makes the savepoints, and so the rollback, real.
    """
    options: dict[str, Any] = {"poolclass": NullPool}
    if url.startswith("sqlite"):
        options["connect_args"] = {"timeout": 30}
    engine = create_async_engine(url, **options)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_no_driver_transactions)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
    return engine


def _sqlite_no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN")


@asynccontextmanager
async def task_db_session(
    url: str | None = None,
    *,
    engine: AsyncEngine | None = None,
    create_tables: MetaData | Sequence[Table] | None = None,
) -> AsyncIterator[AsyncSession]:
    """A session on a real database whose every change is rolled back on exit.

    The database is ``engine``'s, else ``url``'s, else the one the framework
    is configured with (``DATABASE_URL``). ``create_tables`` (a ``MetaData``
    or a list of tables) creates the missing ones inside the outer
    transaction, so they are gone again on exit (PostgreSQL and SQLite both
    have transactional DDL). A SQLite ``engine`` of your own must come from
    ``create_test_engine``, or its savepoints do nothing.
    Pass the session to ``TaskTestContext(session=...)``; the test reads the
    task's writes through the same session.
    """
    own_engine = engine is None
    if engine is None:
        engine = create_test_engine(url or database.configured_url)
    try:
        async with engine.connect() as connection:
            outer = await connection.begin()
            try:
                if create_tables is not None:
                    await connection.run_sync(_create, create_tables)
                session = AsyncSession(
                    bind=connection,
                    join_transaction_mode="create_savepoint",
                    expire_on_commit=False,
                )
                try:
                    yield session
                finally:
                    await session.close()
            finally:
                await outer.rollback()
    finally:
        if own_engine:
            await engine.dispose()


def _create(connection: Connection, tables: MetaData | Sequence[Table]) -> None:
    if isinstance(tables, MetaData):
        tables.create_all(connection)
    else:
        for table in tables:
            table.create(connection, checkfirst=True)
