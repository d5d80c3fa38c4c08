"""``GET /tasks/{task_id}``: what happened to a task; ``DELETE`` revokes it.

An id is answered 404 when nothing is known about it: never dispatched through
this app (the framework records ``SENT`` at publish time), or its result has
expired. A task written to the outbox is unknown until the relay sends it, and
one registered with ``delay_on_commit`` until its transaction commits.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from app.core.background import celery_app
from app.core.background.fastapi import TaskState, get_task_status, record_revoked

router = APIRouter(prefix="/tasks", tags=["tasks"])

UNKNOWN = "unknown task id: never dispatched, or its result has expired"


class TaskStatusOut(BaseModel):
    task_id: str
    state: TaskState
    result: Any = None
    error_type: str | None = None
    error_module: str | None = None
    error_message: str | None = None
    attempt: int | None = None
    progress: dict[str, Any] | None = None
    worker: dict[str, Any] | None = None


class Revoked(BaseModel):
    task_id: str
    state: TaskState
    terminated: bool


# Plain ``def`` endpoints: the result backend client blocks, so FastAPI runs them in a thread.
@router.get("/{task_id}", response_model=TaskStatusOut, responses={404: {"description": UNKNOWN}})
def get_task(task_id: str) -> TaskStatusOut:
    status = get_task_status(celery_app, task_id)
    if not status.known:
        raise HTTPException(status_code=404, detail=UNKNOWN)
    return TaskStatusOut(
        task_id=status.task_id,
        state=status.state,
        result=status.result,
        error_type=status.error_type,
        error_module=status.error_module,
        error_message=status.error_message,
        attempt=status.attempt,
        progress=status.progress,
        worker=status.extra or None,
    )


@router.delete("/{task_id}", response_model=Revoked, responses={404: {"description": UNKNOWN}})
def revoke_task(task_id: str, terminate: bool = False) -> Revoked:
    """Revoke: a queued or scheduled task never starts; ``terminate=true`` also kills a running one.

    The ``REVOKED`` state is stored at once (unless the task already finished),
    so the status is right even before a worker sees the revocation.
    """
    status = get_task_status(celery_app, task_id)
    if not status.known:
        raise HTTPException(status_code=404, detail=UNKNOWN)
    if status.finished:
        return Revoked(task_id=task_id, state=status.state, terminated=False)
    celery_app.control.revoke(task_id, terminate=terminate, signal="SIGTERM")
    record_revoked(celery_app, task_id, "revoked through the API")
    return Revoked(task_id=task_id, state="revoked", terminated=terminate)
