"""Example simple task: send a notification (no database)."""

from __future__ import annotations

from typing import Any

from app.core.background import TaskContext, simple_task

__all__ = ("send_notification",)


@simple_task(name="notifications.send_notification", retry_policy="standard", queue="default")
def send_notification(ctx: TaskContext, user_id: str, message: str) -> dict[str, Any]:
    user_uuid = ctx.validate_uuid(user_id, "user_id")
    ctx.log_info("Sending notification", user_id=str(user_uuid), length=len(message))
    # A real sender would call an e-mail, SMS or push service here.
    return ctx.success_result(sent=True, user_id=str(user_uuid))
