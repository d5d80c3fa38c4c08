"""The example app with the tests' task module imported, as a service imports its own.

``uvicorn tests.support.operations_app:app``: the operations page replays a
task only when it is registered in the serving process (the app's own task
modules are imported on demand; the tests' are not among them).
"""

import tests.support.tasks_operations  # noqa: F401 - registers tests.ops.*
from app.main import app

__all__ = ["app"]
