"""For the engineer on call: dead letters, replay, running and stuck tasks, one page.

``operations_router(guard=..., app=celery_app)`` gives the JSON endpoints and
the server-rendered page; the application mounts it behind a dependency of
its own (``app/api/operations.py`` shows one). The same operations are
available from code (``DeadLetterStore``, ``replay``, ``replay_where``,
``running_tasks``, ``queue_depths``, ``revoke``) and from the command line
(``python -m app.core.background dead-letters``).
"""

from .internals.console.replay import ReplayOutcome, ReplaySummary, replay, replay_where
from .internals.console.router import operations_router
from .internals.operations.cancel import NotCancellableError, TaskCancelledError, revoke
from .internals.operations.dead_letters import (
    DeadLetter,
    DeadLetterFilter,
    DeadLetterGroup,
    DeadLetterStore,
    dead_letters,
)
from .internals.operations.running import RunningTask, queue_depths, running_tasks

__all__ = (
    "operations_router",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterGroup",
    "DeadLetterStore",
    "dead_letters",
    "ReplayOutcome",
    "ReplaySummary",
    "replay",
    "replay_where",
    "RunningTask",
    "running_tasks",
    "queue_depths",
    "revoke",
    "NotCancellableError",
    "TaskCancelledError",
)
