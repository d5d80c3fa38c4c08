"""Test helpers for task modules: run a task body with a recording context, or on a real database.

``TaskTestContext`` and ``mock_task_session`` (also importable from
``app.core.background``, as the specification shows) run a body in the test's
own process; ``task_db_session`` gives a session on the configured database
inside a transaction that is rolled back after the test.
"""

from .internals.testing import LoggedRecord, MockTaskSession, TaskTestContext, mock_task_session
from .internals.testing_db import create_test_engine, task_db_session

__all__ = (
    "TaskTestContext",
    "LoggedRecord",
    "mock_task_session",
    "MockTaskSession",
    "task_db_session",
    "create_test_engine",
)
