"""The app plus bench-only endpoints that dispatch in different ways (bench_api_dispatch.py)."""

from __future__ import annotations

import uuid
from typing import Any

import anyio.to_thread

from app.api.deps import TaskSessionDep
from app.entities.models import Entity
from app.entities.tasks import process_entity
from app.main import create_app

app = create_app()


@app.get("/bench/noop")
async def noop() -> dict[str, Any]:
    return {}


@app.post("/bench/async-on-loop")
async def async_on_loop() -> dict[str, Any]:
    # The anti-pattern: a blocking broker round trip on the event loop.
    return {"task_id": process_entity.delay(entity_id=str(uuid.uuid4())).id}


@app.post("/bench/sync-def")
def sync_def() -> dict[str, Any]:
    # A plain ``def`` endpoint: FastAPI runs it in its thread pool.
    return {"task_id": process_entity.delay(entity_id=str(uuid.uuid4())).id}


@app.post("/bench/async-to-thread")
async def async_to_thread() -> dict[str, Any]:
    entity_id = str(uuid.uuid4())
    result = await anyio.to_thread.run_sync(lambda: process_entity.delay(entity_id=entity_id))
    return {"task_id": result.id}


@app.post("/bench/after-commit")
async def after_commit(session: TaskSessionDep) -> dict[str, Any]:
    entity = Entity(id=uuid.uuid4(), name="bench")
    session.add(entity)
    task = process_entity.delay_on_commit(session, entity_id=str(entity.id))
    await session.commit()
    return {"task_id": task.id}


@app.post("/bench/outbox")
async def outbox(session: TaskSessionDep) -> dict[str, Any]:
    entity = Entity(id=uuid.uuid4(), name="bench")
    session.add(entity)
    task = process_entity.delay_via_outbox(session, entity_id=str(entity.id))
    await session.commit()
    return {"task_id": task.id}
