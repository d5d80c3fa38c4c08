"""Async database sessions for db tasks: one engine per worker process.

The engine is created lazily, in the process that uses it (a prefork child,
after the fork), on the process's event loop, and disposed when the process
shuts down. Using it before it is configured is a clear error.

Pool size: ``DatabaseConfig.pool_size`` when given (``DATABASE_POOL_SIZE``);
unset, a process that runs one task at a time keeps ``DEFAULT_POOL_SIZE``
connections, and a process that runs many at once (the asyncio pool says how
many: ``expect_concurrency``) one per concurrent run, up to
``CONCURRENT_POOL_CAP``. Beyond the pool, ``max_overflow`` more are opened
for a while; a run that finds none free waits at most ``pool_timeout``
seconds, then fails with SQLAlchemy's ``TimeoutError``, a retriable error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy.ext.asyncio
from sqlalchemy import Table, event, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.schema import CreateIndex, CreateTable

from .exceptions import MissingTablesError, TaskConfigurationError


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """What the framework needs to know to open a task's session."""

    url: str
    # None: chosen for the process (see the module doc).
    pool_size: int | None = None
    pool_pre_ping: bool = False
    max_overflow: int = 10
    pool_timeout: float = 30.0
    engine_options: dict[str, Any] = field(default_factory=dict)


# The connections a process keeps when DATABASE_POOL_SIZE is unset. With
# SQLAlchemy's default overflow (10), two asyncio workers at any concurrency
# hold at most 2 x (20 + 10) = 60 connections: under PostgreSQL's default
# max_connections (100), with room for the API and the other processes.
DEFAULT_POOL_SIZE = 5
CONCURRENT_POOL_CAP = 20


def pool_size_for(config: DatabaseConfig, concurrency: int = 1) -> int:
    """The engine's pool size for a process running up to ``concurrency`` tasks at once."""
    if config.pool_size is not None:
        return config.pool_size
    return max(DEFAULT_POOL_SIZE, min(concurrency, CONCURRENT_POOL_CAP))


def create_engine(config: DatabaseConfig, concurrency: int = 1) -> AsyncEngine:
    """An async engine with settings that suit both the API and the workers."""
    options: dict[str, Any] = {
        "pool_pre_ping": config.pool_pre_ping,
        # A database error's text ends with the statement's parameters, which are
        # often task arguments; it is logged ("Task failed") and stored as the
        # task's error. Keep them out, as BACKGROUND_LOG_TASK_ARGUMENTS promises
        # (engine_options={"hide_parameters": False} to debug).
        "hide_parameters": True,
    }
    if config.url.startswith("sqlite"):
        # Workers and the API write to one file: wait for locks instead of failing.
        options["connect_args"] = {"timeout": 30}
    else:
        options["pool_size"] = pool_size_for(config, concurrency)
        options["max_overflow"] = config.max_overflow
        options["pool_timeout"] = config.pool_timeout
    options.update(config.engine_options)
    # Looked up on its module at each call: with tracing on, SQLAlchemy's instrumentation
    # wraps it there (observability/otel.py), and the engine's statements become spans.
    engine = sqlalchemy.ext.asyncio.create_async_engine(config.url, **options)
    if config.url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    return engine


async def create_table(engine: AsyncEngine, ddl: str | Table, lock_id: int) -> None:
    """Run ``ddl`` (a ``CREATE TABLE IF NOT EXISTS``, or a Core ``Table`` with its indexes).

    Two PostgreSQL sessions running it at the same moment can both miss the
    other's table, and one then fails (duplicate type or key): on PostgreSQL
    they take turns on the advisory lock ``lock_id`` and the second sees the
    table. A ``Table`` is created with ``IF NOT EXISTS`` statements, not
    SQLAlchemy's check-then-create, which two SQLite connections can race
    through ("table already exists").
    """
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(text(f"SELECT pg_advisory_xact_lock({lock_id})"))
        if isinstance(ddl, Table):
            await connection.execute(CreateTable(ddl, if_not_exists=True))
            for index in sorted(ddl.indexes, key=lambda index: str(index.name)):
                await connection.execute(CreateIndex(index, if_not_exists=True))
        else:
            await connection.execute(text(ddl))


class TableCreation:
    """Whether the framework creates its tables on a database server at run time.

    On (the default, for the test helpers and code that uses the stores
    directly): each table is created on first use, as ``create_table`` does.
    Off (the app factory sets it from ``DATABASE_CREATE_TABLES``; off on
    PostgreSQL unless set): the tables come from the migrations, and a
    missing one raises ``MissingTablesError``. A SQLite file always gets its
    tables at run time: it is the embedded default, one command with no
    migrations to run.
    """

    def __init__(self) -> None:
        self.on_servers = True

    def configure(self, on_servers: bool) -> None:
        self.on_servers = on_servers


table_creation = TableCreation()


async def ensure_table(engine: AsyncEngine, table: Table, lock_id: int) -> None:
    """Create ``table`` (``create_table``), or check that it exists when creation is off."""
    if table_creation.on_servers or engine.dialect.name == "sqlite":
        await create_table(engine, table, lock_id)
    else:
        await check_tables(engine, [table])


async def missing_tables(engine: AsyncEngine, tables: Sequence[Table]) -> list[str]:
    """The names of ``tables`` that do not exist in ``engine``'s database."""
    async with engine.connect() as connection:
        present = set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))
    return [table.name for table in tables if table.name not in present]


async def check_tables(engine: AsyncEngine, tables: Sequence[Table]) -> None:
    """Raise ``MissingTablesError`` (naming them and the database) unless ``tables`` exist."""
    missing = await missing_tables(engine, tables)
    if missing:
        raise MissingTablesError(missing, engine.url.render_as_string(hide_password=True))


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


_NOT_CONFIGURED = (
    "the background database is not configured: import "
    "app.core.background.celery_app (it configures it from the settings) "
    "or call configure_database() first"
)


class DatabaseRuntime:
    """The per-process engine and session factory used by ``@db_task``."""

    def __init__(self) -> None:
        self._config: DatabaseConfig | None = None
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._pid: int | None = None
        # How many runs of this process may use the engine at once.
        self._concurrency = 1

    def configure(self, config: DatabaseConfig) -> None:
        """Say which database to use; nothing connects until a task needs it."""
        self._config = config
        self._engine = self._sessions = None

    def expect_concurrency(self, runs: int) -> None:
        """Size the engine (opened later) for ``runs`` tasks at once (the asyncio pool)."""
        self._concurrency = runs

    @property
    def pool_size(self) -> int:
        """The size of the engine's pool in this process (for tests and operators)."""
        if self._config is None:
            raise TaskConfigurationError(_NOT_CONFIGURED)
        return pool_size_for(self._config, self._concurrency)

    @property
    def configured_url(self) -> str:
        """The URL given to ``configure`` (the test helpers open their own engine on it)."""
        if self._config is None:
            raise TaskConfigurationError(_NOT_CONFIGURED)
        return self._config.url

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None or self._pid != os.getpid():
            self._open()
        assert self._engine is not None
        return self._engine

    def _open(self) -> None:
        if self._config is None:
            raise TaskConfigurationError(_NOT_CONFIGURED)
        self._engine = create_engine(self._config, self._concurrency)
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)
        self._pid = os.getpid()

    def session_factory(self) -> Callable[[], AsyncSession]:
        self.engine  # noqa: B018 - opens the engine in this process if needed
        assert self._sessions is not None
        return self._sessions

    async def dispose(self) -> None:
        """Close every pooled connection of this process's engine."""
        engine, self._engine, self._sessions = self._engine, None, None
        if engine is not None and self._pid == os.getpid():
            await engine.dispose()

    def forget(self) -> None:
        """Drop an engine inherited through fork without touching its sockets."""
        self._engine = self._sessions = None
        self._pid = None
        self._concurrency = 1


database = DatabaseRuntime()
os.register_at_fork(after_in_child=database.forget)
