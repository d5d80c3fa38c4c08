"""Batch operations: iter_batches, commit_batch, stats, progress and the watch command.

The first part drives ``TaskContext`` directly with a real ``AsyncSession`` on
this run's PostgreSQL database; the second runs tasks on the real worker.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from app.core.background import (
    TaskConfigurationError,
    TaskTestContext,
    TaskValidationError,
    celery_app,
)
from app.core.background.internals.operations.worker_process import WorkerProcess
from app.entities.crud import entity_crud
from app.entities.models import Entity
from tests.conftest import PrivateBroker
from tests.support.db import fetchval
from tests.support.services import Services, private_database

REPO = Path(__file__).resolve().parents[2]


class GetOnlyCrud:
    """The specification's CRUD interface: ``get`` and nothing else."""

    async def get(self, session: AsyncSession, id: Any) -> Entity | None:
        return await entity_crud.get(session, id)


@pytest.fixture
async def engine(stack: Services) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(stack.postgres_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    async with AsyncSession(engine, expire_on_commit=False) as session:
        yield session


@pytest.fixture
def selects(engine: AsyncEngine) -> list[str]:
    """Every SELECT the engine sends, to count queries."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    return statements


async def create_entities(engine: AsyncEngine, count: int) -> list[str]:
    ids = [uuid.uuid4() for _ in range(count)]
    async with AsyncSession(engine) as session:
        session.add_all(Entity(id=i, name=f"batch-{n}") for n, i in enumerate(ids))
        await session.commit()
    return [str(i) for i in ids]


def create_entities_sync(stack: Services, count: int) -> list[str]:

    async def run() -> list[str]:
        engine = create_async_engine(stack.postgres_url)
        try:
            return await create_entities(engine, count)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def statuses(stack: Services, ids: Sequence[str]) -> list[str]:
    """The entities' status, in the order of ``ids``."""
    return list(
        fetchval(
            stack,
            "SELECT array_agg(status ORDER BY array_position($1::uuid[], id)) "
            "FROM entities WHERE id = ANY($1::uuid[])",
            list(ids),
        )
    )


def call_api(method: str, url: str, **options: Any) -> Any:
    """A request to the FastAPI app, in process (no lifespan: these routes need none)."""

    import httpx

    from app.main import app

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.request(method, url, **options)

    return asyncio.run(run())


async def collect(batches: AsyncIterator[list[Any]]) -> list[list[Any]]:
    return [batch async for batch in batches]


# -- iter_batches ---------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "size", "sizes"),
    [(5, 1, [1, 1, 1, 1, 1]), (6, 3, [3, 3]), (7, 3, [3, 3, 1]), (0, 3, []), (2, 50, [2])],
    ids=["size-1", "exact-multiple", "remainder", "empty", "one-short-batch"],
)
async def test_raw_id_batches_without_crud(count: int, size: int, sizes: list[int]) -> None:
    ids = [f"id-{n}" for n in range(count)]
    batches = await collect(TaskTestContext().iter_batches(ids, None, batch_size=size))
    assert [len(b) for b in batches] == sizes
    assert [i for b in batches for i in b] == ids


@pytest.mark.parametrize(("size", "sizes"), [(1, [1] * 7), (7, [7]), (3, [3, 3, 1])])
async def test_bulk_crud_loads_each_batch_with_one_query(
    engine: AsyncEngine, session: AsyncSession, selects: list[str], size: int, sizes: list[int]
) -> None:
    ids = await create_entities(engine, 7)
    selects.clear()
    ctx = TaskTestContext(session=session)
    batches = await collect(ctx.iter_batches(ids, entity_crud, batch_size=size))
    assert [len(b) for b in batches] == sizes
    assert [str(e.id) for b in batches for e in b] == ids  # the ids' order, not the table's
    assert len(selects) == len(sizes)


async def test_get_only_crud_loads_one_id_at_a_time(
    engine: AsyncEngine, session: AsyncSession, selects: list[str]
) -> None:
    ids = await create_entities(engine, 5)
    selects.clear()
    ctx = TaskTestContext(session=session)
    batches = await collect(ctx.iter_batches(ids, GetOnlyCrud(), batch_size=2))
    assert [[str(e.id) for e in b] for b in batches] == [ids[:2], ids[2:4], ids[4:]]
    assert len(selects) == 5


@pytest.mark.parametrize("crud", [entity_crud, GetOnlyCrud()], ids=["get_many", "get"])
async def test_missing_ids_are_skipped_and_counted_in_the_stats(
    engine: AsyncEngine, session: AsyncSession, crud: Any
) -> None:
    ids = await create_entities(engine, 4)
    ghosts = [str(uuid.uuid4()) for _ in range(3)]
    mixed = [ghosts[0], ids[0], ids[1], ghosts[1], ids[2], ids[3], ghosts[2]]
    ctx = TaskTestContext(session=session)
    stats = ctx.create_stats_counter()
    batches = await collect(ctx.iter_batches(mixed, crud, batch_size=3))
    assert [[str(e.id) for e in b] for b in batches] == [ids[:2], ids[2:], []]
    stats.increment("processed", 4)
    result = ctx.success_result(**stats.to_dict())
    assert result["missing"] == 3
    assert result["processed"] == 4
    assert ctx.batch_stats is stats


async def test_missing_is_reported_as_zero_when_nothing_is_missing(
    engine: AsyncEngine, session: AsyncSession
) -> None:
    ids = await create_entities(engine, 2)
    ctx = TaskTestContext(session=session)
    stats = ctx.create_stats_counter()
    await collect(ctx.iter_batches(ids, entity_crud, batch_size=5))
    assert stats.to_dict() == {"missing": 0}


async def test_any_sync_or_async_iterable_of_ids(
    engine: AsyncEngine, session: AsyncSession
) -> None:
    ids = await create_entities(engine, 5)

    async def from_a_stream() -> AsyncIterator[str]:
        for entity_id in ids:
            yield entity_id

    def from_a_generator() -> Iterator[str]:
        yield from ids

    ctx = TaskTestContext(session=session)
    for source in (from_a_stream(), from_a_generator(), tuple(ids)):
        batches = await collect(ctx.iter_batches(source, entity_crud, batch_size=2))
        assert [[str(e.id) for e in b] for b in batches] == [ids[:2], ids[2:4], ids[4:]]
    raw = await collect(ctx.iter_batches(from_a_stream(), None, batch_size=4))
    assert raw == [ids[:4], ids[4:]]


@pytest.mark.parametrize("size", [0, -1, 2.5, True, "10"])
def test_a_batch_size_below_one_is_refused_at_the_call(size: Any) -> None:
    with pytest.raises(TaskValidationError, match="batch_size must be an integer of at least 1"):
        TaskTestContext().iter_batches(["a"], None, batch_size=size)


def test_other_bad_arguments_are_refused_at_the_call() -> None:
    ctx = TaskTestContext()
    with pytest.raises(TaskValidationError, match="not a string"):
        ctx.iter_batches("0b5f-not-a-list", None)
    with pytest.raises(TaskValidationError, match="iterable"):
        ctx.iter_batches(42, None)  # type: ignore[arg-type]
    with pytest.raises(TaskConfigurationError, match="get"):
        ctx.iter_batches(["a"], object())  # type: ignore[arg-type]


# -- commit_batch ---------------------------------------------------------


async def test_commit_batch_commits_and_releases_the_loaded_objects(
    engine: AsyncEngine, session: AsyncSession
) -> None:
    ids = await create_entities(engine, 6)
    ctx = TaskTestContext(session=session)
    async for batch in ctx.iter_batches(ids, entity_crud, batch_size=3):
        for entity in batch:
            entity.status = "seen"
        assert len(session.identity_map) == 3
        await ctx.commit_batch()
        assert len(session.identity_map) == 0
        assert batch[0].status == "seen"  # still readable, detached
    async with engine.connect() as other:  # committed: seen from another connection
        seen = await other.scalars(select(Entity.status).where(Entity.id.in_(map(uuid.UUID, ids))))
        assert seen.all() == ["seen"] * 6


# -- log_progress ---------------------------------------------------------


def test_log_progress_publishes_first_throttled_and_final_updates() -> None:
    ctx = TaskTestContext()
    ctx.progress_interval = 3600  # nothing in between is due
    for done in range(1, 1001):
        ctx.log_progress(done=done, total=1000, processed=done)
    assert ctx.progress == [
        {"done": 1, "total": 1000, "processed": 1, "percent": 0.1},
        {"done": 1000, "total": 1000, "processed": 1000, "percent": 100.0},
    ]
    assert len(ctx.logged("info")) == 2
    assert len(ctx.logged("debug")) == 998


def test_log_progress_publishes_again_once_the_interval_passed() -> None:
    ctx = TaskTestContext()
    ctx.progress_interval = 0
    for done in range(3):
        ctx.log_progress(done=done, total=10)
    assert [p["done"] for p in ctx.progress] == [0, 1, 2]
    ctx.log_progress(stage="indexing")  # no counts: no percent
    assert ctx.progress[-1] == {"stage": "indexing"}


def test_a_progress_backend_error_does_not_fail_the_task() -> None:
    def broken(_metrics: Any) -> None:
        raise ConnectionError("backend down")

    ctx = TaskTestContext()
    ctx._publish_progress = broken
    ctx.log_progress(done=1, total=2)
    ctx.assert_logged("warning", "Progress not published")


# -- on the worker --------------------------------------------------------


def wait_for(result: AsyncResult[Any], timeout: float = 60) -> Any:
    return result.get(timeout=timeout, propagate=False)


def test_a_failing_batch_rolls_back_alone_and_earlier_batches_stay(
    stack: Services, worker: Any
) -> None:
    ids = create_entities_sync(stack, 10)
    result = celery_app.send_task(
        "tests.batches.fail_in_batch", kwargs={"entity_ids": ids, "batch_size": 3, "fail_at": 2}
    )
    wait_for(result)
    assert result.state == "FAILURE"
    assert statuses(stack, ids) == ["processed"] * 6 + ["new"] * 4


def test_a_retry_resumes_after_the_committed_batches(stack: Services, worker: Any) -> None:
    ids = create_entities_sync(stack, 10)
    result = celery_app.send_task(
        "tests.batches.fail_once_in_batch",
        kwargs={"entity_ids": ids, "batch_size": 3, "fail_at": 2},
    )
    outcome = wait_for(result)
    assert result.state == "SUCCESS", outcome
    assert outcome["attempt"] == 1
    assert (outcome["skipped"], outcome["processed"], outcome["missing"]) == (6, 4, 0)
    counts = fetchval(
        stack, "SELECT array_agg(processed_count) FROM entities WHERE id = ANY($1::uuid[])", ids
    )
    assert counts == [1] * 10  # nobody processed twice


# Its own waits: worker start 60 + two runs 60 each + stop 30 = 210 s.
@pytest.mark.timeout(300)
def test_the_example_task_processes_every_entity_not_processed_yet(
    stack: Services, private_broker: PrivateBroker
) -> None:
    """With no ids the example goes through the whole table: a database of its own, so
    that "every entity" is this test's entities, not the rows other tests left."""
    with private_database(stack) as (url, dsn):
        ids = asyncio.run(create_entities_at(url, 7))
        worker = WorkerProcess({**private_broker.env, "DATABASE_URL": url})
        with worker:
            bulk = private_broker.app.signature("entities.bulk_mark_processed")
            outcome = wait_for(bulk.apply_async(kwargs={"batch_size": 3}))
            assert outcome["status"] == "success", (outcome, worker.log()[-3000:])
            assert (outcome["processed"], outcome["total"], outcome["missing"]) == (7, 7, 0)
            # Run again: nothing left to do (idempotent).
            assert wait_for(bulk.apply_async())["total"] == 0
        rows = asyncio.run(fetch_statuses(dsn, ids))
    assert rows == ["processed"] * 7


async def create_entities_at(url: str, count: int) -> list[str]:
    engine = create_async_engine(url)
    try:
        return await create_entities(engine, count)
    finally:
        await engine.dispose()


async def fetch_statuses(dsn: str, ids: Sequence[str]) -> list[str]:
    import asyncpg

    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT status FROM entities WHERE id = ANY($1::uuid[]) ORDER BY id", list(ids)
        )
    finally:
        await connection.close()
    return [row["status"] for row in rows]


# Its own waits: PROGRESS 60 + watch 60, plus the session worker's start (60) if first = 180 s.
@pytest.mark.timeout(240)
def test_progress_is_visible_while_the_task_runs_and_watch_follows_it(
    stack: Services, worker: Any, redis_client: Any
) -> None:
    ids = [*create_entities_sync(stack, 8), str(uuid.uuid4())]  # one missing
    key = uuid.uuid4().hex
    result = celery_app.send_task(
        "tests.batches.progress_until_released",
        kwargs={"entity_ids": ids, "batch_size": 4, "key": key},
    )
    deadline = time.monotonic() + 60
    while result.state != "PROGRESS" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert result.state == "PROGRESS"
    expected = {"done": 4, "total": 9, "percent": 44.4, "processed": 4, "missing": 0}
    assert result.info == expected
    status = call_api("GET", f"/tasks/{result.id}").json()
    assert (status["state"], status["progress"]) == ("progress", expected)

    watcher = subprocess.Popen(
        [sys.executable, "-m", "app.core.background", "watch", result.id, "--interval", "0.05"],
        cwd=REPO,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()
        assert first.startswith("[##########"), first  # 30 * 44.4% = 13 of 30 filled
        assert " 44.4% 4/9  missing=0 processed=4" in first, first
        redis_client.set(f"release:{key}", 1)
        rest, errors = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
        watcher.wait()
    assert watcher.returncode == 0, errors
    # The API's state names, not Celery's SUCCESS.
    assert "success\n" in rest.splitlines(keepends=True), rest
    assert '"processed": 8' in rest
    assert '"missing": 1' in rest


def test_watch_prints_the_error_of_a_failed_task(stack: Services, worker: Any) -> None:
    ids = create_entities_sync(stack, 2)
    result = celery_app.send_task(
        "tests.batches.fail_in_batch", kwargs={"entity_ids": ids, "batch_size": 1, "fail_at": 0}
    )
    wait_for(result)
    done = subprocess.run(
        [sys.executable, "-m", "app.core.background", "watch", result.id, "--interval", "0.05"],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "failure  RuntimeError: batch 0 fails" in done.stdout


def test_watch_gives_up_on_an_id_the_api_does_not_know(stack: Services, worker: Any) -> None:
    task_id = str(uuid.uuid4())
    assert call_api("GET", f"/tasks/{task_id}").status_code == 404
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "app.core.background", "watch", task_id, "--unknown-timeout", "1"],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert f"unknown task id {task_id}: never dispatched" in done.stderr
    assert time.monotonic() - began < 30
