"""The Alembic migrations: the schema the code expects, on PostgreSQL and SQLite.

Each test migrates a database of its own (a fresh PostgreSQL database, dropped
afterwards, or a fresh SQLite file) with ``alembic`` run as a user runs it,
then asks autogenerate's comparison what it would change: nothing. Without
the migrations, a worker and the API on PostgreSQL refuse to start and say
to run them; after them, the worker runs a ``@db_task``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import Column, Integer, MetaData, Table, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from app.core.background import MissingTablesError
from app.core.background.database import (
    FRAMEWORK_TABLES,
    include_framework_tables,
    include_name,
)
from app.core.background.internals.operations.worker_process import (
    WorkerProcess,
    WorkerStartError,
)
from app.core.config import Settings
from app.entities.models import Entity
from app.main import create_app
from tests.conftest import PrivateBroker
from tests.support.migrations import alembic_command, schema_differences
from tests.support.services import Services

FRAMEWORK_TABLE_NAMES = {table.name for table in FRAMEWORK_TABLES}
# What `alembic upgrade head` creates: the application's tables, the framework's.
EXPECTED_TABLES = {"entities"} | FRAMEWORK_TABLE_NAMES
UPGRADE_HINT = "run `alembic upgrade head`"


@pytest.fixture
def fresh_postgres(postgres_service: Services) -> Iterator[str]:
    """An empty PostgreSQL database of this test's own (async URL), dropped afterwards."""
    with postgres_service.private_database() as url:
        yield url


@pytest.fixture(params=["postgres", "sqlite"])
def fresh_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/app.db"
    url: str = request.getfixturevalue("fresh_postgres")
    return url


def table_names(url: str) -> set[str]:
    async def read() -> set[str]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as connection:
                return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))
        finally:
            await engine.dispose()

    return asyncio.run(read())


def migrate(url: str, *args: str) -> None:
    result = alembic_command(url, *args)
    assert result.returncode == 0, result.stderr[-3000:]


# -- the schema ------------------------------------------------------------------------


def test_upgrade_head_gives_the_schema_the_models_declare(fresh_database: str) -> None:
    # Before: autogenerate would add every table (the comparison sees them all).
    before = schema_differences(fresh_database)
    for name in EXPECTED_TABLES:
        assert any("add_table" in diff and f"'{name}'" in diff for diff in before), (name, before)

    migrate(fresh_database, "upgrade", "head")

    assert table_names(fresh_database) == EXPECTED_TABLES | {"alembic_version"}
    assert schema_differences(fresh_database) == []
    # The user's command for the same question.
    check = alembic_command(fresh_database, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr


def test_a_changed_table_is_found_by_the_comparison(fresh_database: str) -> None:
    """The comparison is not blind to the framework's tables: a missing index shows."""
    migrate(fresh_database, "upgrade", "head")

    async def drop_index() -> None:
        engine = create_async_engine(fresh_database)
        try:
            async with engine.begin() as connection:
                await connection.execute(text("DROP INDEX background_dead_letters_group"))
        finally:
            await engine.dispose()

    asyncio.run(drop_index())
    differences = schema_differences(fresh_database)
    assert len(differences) == 1, differences
    assert "add_index" in differences[0]
    assert "background_dead_letters_group" in differences[0]


def test_downgrade_base_removes_every_table(fresh_database: str) -> None:
    migrate(fresh_database, "upgrade", "head")
    migrate(fresh_database, "downgrade", "base")
    assert table_names(fresh_database) == {"alembic_version"}
    # And up again: the migration is repeatable.
    migrate(fresh_database, "upgrade", "head")
    assert schema_differences(fresh_database) == []


def test_a_users_autogenerate_keeps_the_framework_tables(fresh_database: str) -> None:
    """A user's own env: their metadata plus ``include_framework_tables``, and ``include_name``.

    Autogenerate proposes only the user's new table: never to drop the
    framework's tables, nor a database result backend's (Celery's) that
    share the database.
    """
    migrate(fresh_database, "upgrade", "head")

    async def add_result_backend_table() -> None:
        engine = create_async_engine(fresh_database)
        try:
            async with engine.begin() as connection:
                await connection.execute(
                    text("CREATE TABLE celery_taskmeta (id INTEGER PRIMARY KEY)")
                )
        finally:
            await engine.dispose()

    asyncio.run(add_result_backend_table())

    def users_metadata(with_framework: bool) -> MetaData:
        metadata = MetaData()
        Table("users_things", metadata, Column("id", Integer, primary_key=True))
        Entity.__table__.to_metadata(metadata)
        return include_framework_tables(metadata) if with_framework else metadata

    def compare(metadata: MetaData, opts: dict[str, Any]) -> list[Any]:
        async def run() -> list[Any]:
            engine = create_async_engine(fresh_database)
            try:
                async with engine.connect() as connection:
                    return await connection.run_sync(
                        lambda sync: compare_metadata(
                            MigrationContext.configure(sync, opts=opts), metadata
                        )
                    )
            finally:
                await engine.dispose()

        return asyncio.run(run())

    differences = compare(users_metadata(True), {"include_name": include_name})
    assert [(diff[0], diff[1].name) for diff in differences] == [("add_table", "users_things")]

    # Without them, autogenerate would drop the framework's tables and Celery's.
    dropped = {
        diff[1].name
        for diff in compare(users_metadata(False), {})
        if isinstance(diff, tuple) and diff[0] == "remove_table"
    }
    assert dropped == FRAMEWORK_TABLE_NAMES | {"celery_taskmeta"}


def test_include_framework_tables_is_idempotent_and_keeps_a_users_own_table() -> None:
    metadata = MetaData()
    own = Table("background_outbox", metadata, Column("id", Integer, primary_key=True))
    include_framework_tables(metadata)
    include_framework_tables(metadata)
    assert set(metadata.tables) == FRAMEWORK_TABLE_NAMES
    assert metadata.tables["background_outbox"] is own


# -- start-up on PostgreSQL: no tables created at run time ----------------------------


def test_a_worker_without_migrations_stops_and_says_to_run_them(
    fresh_postgres: str, private_broker: PrivateBroker
) -> None:
    worker = WorkerProcess(
        {**private_broker.env, "DATABASE_URL": fresh_postgres, "DATABASE_CREATE_TABLES": "false"}
    )
    with pytest.raises(WorkerStartError) as raised:
        worker.start()
    message = str(raised.value)
    assert UPGRADE_HINT in message, message
    assert "background_task_completions" in message
    assert fresh_postgres.rsplit("/", 1)[1] in message
    # It created nothing.
    assert table_names(fresh_postgres) == set()


def test_the_api_without_migrations_stops_and_says_to_run_them(fresh_postgres: str) -> None:
    app = create_app(Settings(database_url=fresh_postgres, database_create_tables=False))
    with pytest.raises(MissingTablesError) as raised, TestClient(app):
        pass
    assert UPGRADE_HINT in str(raised.value)
    assert "entities" in raised.value.tables
    assert set(raised.value.tables) >= FRAMEWORK_TABLE_NAMES
    assert table_names(fresh_postgres) == set()


# Its own waits: migrations 120 + worker start 60 + a task 60 + stop 30.
@pytest.mark.timeout(300)
def test_after_the_migrations_the_worker_starts_and_runs_a_db_task(
    fresh_postgres: str, private_broker: PrivateBroker
) -> None:
    migrate(fresh_postgres, "upgrade", "head")
    entity_id = uuid.uuid4()

    async def rows(sql: str, **params: Any) -> Any:
        engine = create_async_engine(fresh_postgres)
        try:
            async with engine.begin() as connection:
                result = await connection.execute(text(sql), params)
                return result.all() if result.returns_rows else None
        finally:
            await engine.dispose()

    asyncio.run(
        rows(
            "INSERT INTO entities (id, name, status, processed_count) "
            "VALUES (:id, 'migrated', 'new', 0)",
            id=entity_id,
        )
    )
    env = {**private_broker.env, "DATABASE_URL": fresh_postgres, "DATABASE_CREATE_TABLES": "false"}
    with WorkerProcess(env) as worker:
        result = private_broker.app.send_task(
            "entities.process_entity", kwargs={"entity_id": str(entity_id)}
        )
        outcome = result.get(timeout=60)
        log = worker.log()
    assert outcome["status"] == "success", (outcome, log[-3000:])
    assert asyncio.run(rows("SELECT processed_count FROM entities")) == [(1,)]
    assert UPGRADE_HINT not in log
    # The worker used the migrated tables; it created none of its own.
    assert table_names(fresh_postgres) == EXPECTED_TABLES | {"alembic_version"}
