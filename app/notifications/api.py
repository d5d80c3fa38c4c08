from __future__ import annotations

import uuid

from fastapi import APIRouter
from pydantic import BaseModel

from app.notifications.tasks import send_notification

router = APIRouter(prefix="/notifications", tags=["notifications"])


class NotificationIn(BaseModel):
    user_id: uuid.UUID
    message: str


class Dispatched(BaseModel):
    task_id: str


@router.post("", response_model=Dispatched, status_code=202)
def notify(body: NotificationIn) -> Dispatched:
    result = send_notification.delay(user_id=str(body.user_id), message=body.message)
    return Dispatched(task_id=result.id)
