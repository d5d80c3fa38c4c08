"""``GET /tasks/{task_id}``: what happened to a task."""

from __future__ import annotations

from typing import Any

from celery.result import AsyncResult
from fastapi import APIRouter
from pydantic import BaseModel

from app.core.background import celery_app

router = APIRouter(prefix="/tasks", tags=["tasks"])


class TaskStatus(BaseModel):
    task_id: str
    state: str
    result: Any = None
    error_type: str | None = None
    error_message: str | None = None
    progress: dict[str, Any] | None = None
    note: str | None = None


def describe(result: AsyncResult[Any]) -> TaskStatus:
    state = str(result.state)
    status = TaskStatus(task_id=result.id, state=state.lower())
    if state == "SUCCESS":
        status.result = result.result
    elif state in ("FAILURE", "RETRY"):
        error = result.result
        status.error_type = type(error).__name__
        status.error_message = str(error)
    elif state == "PROGRESS":
        status.progress = result.info if isinstance(result.info, dict) else None
    elif state == "PENDING":
        # Celery cannot tell a queued task from an id it has never seen.
        status.note = "queued, or unknown to the result backend"
    return status


# A plain ``def``: the result backend client blocks, so FastAPI runs it in a thread.
@router.get("/{task_id}", response_model=TaskStatus)
def get_task_status(task_id: str) -> TaskStatus:
    return describe(AsyncResult(task_id, app=celery_app))
