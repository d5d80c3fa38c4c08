"""The real-database test helper and the pytest plugin, on real services.

``task_db_session`` must let a task commit (directly and through
``ctx.commit_batch``) and the test see it, then leave no row behind, on
PostgreSQL and on SQLite. The plugin's worker fixture must run a task over a
real broker, in a pytest run of its own, as a user's project would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from app.core.background import TaskTestContext, TaskValidationError
from app.core.background.testing import task_db_session
from tests.support.models import Record
from tests.support.redis_server import RedisServer
from tests.support.services import Services, unavailable
from tests.support.tasks_testing import write_in_batches, write_then_fail


async def _count(session: AsyncSession, prefix: str) -> int:
    query = select(func.count()).select_from(Record).where(Record.key.startswith(prefix))
    return int(await session.scalar(query) or 0)


async def _run_committing_task(url: str) -> str:
    """Run the committing task in the helper; check what it sees inside. The key prefix."""
    prefix = uuid.uuid4().hex
    async with task_db_session(url) as session:
        ctx = TaskTestContext(session=session)
        result = await write_in_batches(ctx, prefix=prefix, count=3)
        assert result["written"] == 3
        ctx.assert_logged_success("Written", total=3)
        # The test sees the task's commits through the same session...
        assert await _count(session, prefix) == 3
        # ...and the session is still usable after them.
        session.add(Record(key=f"{prefix}-extra"))
        await session.flush()
        assert await _count(session, prefix) == 4
    return prefix


# -- PostgreSQL -------------------------------------------------------------------


async def _pg_rows(stack: Services, prefix: str) -> int:
    """Rows seen from a connection of its own (not the helper's)."""
    connection = await asyncpg.connect(stack.postgres_dsn)
    try:
        query = "SELECT count(*) FROM test_records WHERE key LIKE $1"
        return int(await connection.fetchval(query, f"{prefix}%"))
    finally:
        await connection.close()


async def test_postgres_task_commits_are_seen_then_rolled_back(stack: Services) -> None:
    prefix = await _run_committing_task(stack.postgres_url)
    assert await _pg_rows(stack, prefix) == 0


async def test_postgres_failing_task_rolls_back_to_its_savepoint(stack: Services) -> None:
    key = uuid.uuid4().hex
    async with task_db_session(stack.postgres_url) as session:
        session.add(Record(key=f"{key}-before"))
        await session.commit()  # the test's own setup, kept until the end
        ctx = TaskTestContext(session=session)
        with pytest.raises(TaskValidationError):
            await write_then_fail(ctx, key=key)
        assert await session.get(Record, key) is None
        assert await session.get(Record, f"{key}-before") is not None
    assert await _pg_rows(stack, key) == 0


async def test_plugin_db_fixture_runs_on_the_configured_database(
    stack: Services, background_db_context: TaskTestContext
) -> None:
    prefix = uuid.uuid4().hex
    await write_in_batches(background_db_context, prefix=prefix, count=2)
    assert await _count(background_db_context.session, prefix) == 2
    # A separate connection does not see the uncommitted outer transaction.
    assert await _pg_rows(stack, prefix) == 0


# -- SQLite -----------------------------------------------------------------------


async def _sqlite_rows(url: str, prefix: str) -> int:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            query = text("SELECT count(*) FROM test_records WHERE key LIKE :p")
            return int((await connection.execute(query, {"p": f"{prefix}%"})).scalar_one())
    finally:
        await engine.dispose()


async def test_sqlite_task_commits_are_seen_then_rolled_back(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(Record.metadata.create_all, tables=[Record.__table__])
    await engine.dispose()

    prefix = await _run_committing_task(url)
    assert await _sqlite_rows(url, prefix) == 0


async def test_sqlite_tables_created_by_the_helper_are_gone_afterwards(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    async with task_db_session(url, create_tables=[Record.__table__]) as session:
        await write_in_batches(TaskTestContext(session=session), prefix="p", count=2)
        assert await _count(session, "p") == 2
    engine = create_async_engine(url)
    async with engine.connect() as connection:
        tables = await connection.run_sync(
            lambda sync: sync.exec_driver_sql("SELECT name FROM sqlite_master").all()
        )
    await engine.dispose()
    assert tables == []


# -- the plugin's worker fixture, in a pytest run of its own --------------------------

USER_TEST = """
import uuid

from app.notifications.tasks import send_notification


def test_worker_runs_a_task(background_worker):
    user_id = str(uuid.uuid4())
    result = send_notification.delay(user_id=user_id, message="hello")
    assert result.get(timeout=60) == {
        "status": "success", "task_id": result.id, "sent": True, "user_id": user_id,
    }
    assert "notifications.send_notification" in background_worker.log()
    print("WORKER-PID", background_worker.pid)
"""


PYTEST_INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
filterwarnings =
    error
    ignore::celery.exceptions.CPendingDeprecationWarning
"""


# Its own waits: its Redis server's start (5 tries x 15) + the inner pytest run 110 = 185 s.
@pytest.mark.timeout(240)
def test_plugin_worker_fixture_runs_a_task_over_redis(tmp_path: Path) -> None:
    # A Redis server of its own: this run's session worker must not take the task.
    try:
        broker = RedisServer().start()
    except (FileNotFoundError, RuntimeError) as exc:
        unavailable(str(exc))
    try:
        (tmp_path / "test_user_project.py").write_text(textwrap.dedent(USER_TEST))
        (tmp_path / "pytest.ini").write_text(PYTEST_INI)
        env = {
            **os.environ,
            "CELERY_BROKER_URL": broker.url(),
            "CELERY_RESULT_BACKEND": broker.url(),
        }
        env.pop("PYTEST_ADDOPTS", None)
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s", str(tmp_path)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110,
        )  # fmt: skip
    finally:
        broker.close()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    assert "WORKER-PID" in run.stdout
