"""For the web side: a session that sends its tasks when it commits, and task status.

``TaskSession`` is an ``AsyncSession`` for ``async_sessionmaker(class_=...)``:
``task.delay_on_commit(session, ...)`` registers a task on it, and its
``commit()`` sends them (``pending_dispatches`` lists those still waiting).
``get_task_status`` reads what happened to a task, as ``GET /tasks/{id}`` serves it.
"""

from .internals.delivery.after_commit import TaskSession, pending_dispatches
from .internals.operations.status import TaskState, TaskStatus, get_task_status, record_revoked

__all__ = (
    "TaskSession",
    "pending_dispatches",
    "TaskState",
    "TaskStatus",
    "get_task_status",
    "record_revoked",
)
