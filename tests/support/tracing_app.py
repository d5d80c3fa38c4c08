"""The API with endpoints that send the tracing test's tasks by each send path.

``uvicorn tests.support.tracing_app:app``: the application's own factory
(``app.main.create_app``: its lifespan starts tracing, its FastAPI
instrumentation makes the request spans), plus one endpoint per send path.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import SessionDep, TaskSessionDep
from app.main import create_app
from tests.support.models import Record
from tests.support.tasks_tracing import doomed, flaky, write

router = APIRouter(prefix="/trace")


@router.post("/delay")
def send_delay(key: str) -> dict[str, Any]:
    return {"task_ids": [write.delay(key).id]}


@router.post("/on-commit")
async def send_on_commit(key: str, session: TaskSessionDep) -> dict[str, Any]:
    session.add(Record(key=f"{key}-api"))
    result = write.delay_on_commit(session, key=key)
    await session.commit()
    return {"task_ids": [result.id]}


@router.post("/outbox")
async def send_via_outbox(key: str, session: SessionDep) -> dict[str, Any]:
    result = write.delay_via_outbox(session, key=key)
    await session.commit()
    return {"task_ids": [result.id]}


@router.post("/many")
def send_many(key: str) -> dict[str, Any]:
    results = write.delay_many([{"key": f"{key}-0"}, {"key": f"{key}-1"}])
    return {"task_ids": [result.id for result in results]}


@router.post("/retry")
def send_flaky(key: str) -> dict[str, Any]:
    return {"task_ids": [flaky.delay(key).id]}


@router.post("/doomed")
def send_doomed(key: str) -> dict[str, Any]:
    return {"task_ids": [doomed.delay(key).id]}


app = create_app()
app.include_router(router)
