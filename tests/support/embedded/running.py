"""A producer on the embedded default that watches one run through ``running_tasks``.

Run as its own process by tests/integration/test_embedded_default.py (the
worker includes tests.support.tasks_asyncio_pool). Prints one JSON object:
the run as listed while it ran, and the list after it ended.
"""

from __future__ import annotations

import json
import time

from app.core.background import celery_app
from app.core.background.operations import running_tasks

WAIT = 30.0


def main() -> None:
    result = celery_app.send_task("pool.sleep", kwargs={"key": "embedded", "seconds": 3.0})
    listed = None
    deadline = time.monotonic() + WAIT
    while listed is None and time.monotonic() < deadline:
        found = running_tasks(celery_app) or []
        listed = next((run.as_dict() for run in found if run.task_id == result.id), None)
        time.sleep(0.1)
    result.get(timeout=WAIT, interval=0.05)
    after = [run.task_id for run in running_tasks(celery_app) or []]
    print(json.dumps({"task_id": result.id, "listed": listed, "after": after}))


if __name__ == "__main__":
    main()
