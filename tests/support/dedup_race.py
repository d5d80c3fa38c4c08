"""One racer process of the deduplication race (started with multiprocessing 'spawn').

It configures the application from ``env`` before importing it, waits at a
barrier shared by every caller, then calls ``apply_async`` with the same id
from ``threads`` threads at once. It reports the ids its calls were given and
how many messages the process published (a deduplicated call publishes none).
"""

from __future__ import annotations

import os
import threading
from typing import Any


def race(env: dict[str, str], task_id: str, key: str, barrier: Any, threads: int, out: Any) -> None:
    os.environ.update(env)
    from tests.support import tasks_dedup
    from tests.support.publishes import recorded_publishes

    ids: list[str] = []

    def call() -> None:
        barrier.wait(60)
        ids.append(tasks_dedup.run.apply_async((key, 1.0), task_id=task_id).id)

    with recorded_publishes() as published:
        workers = [threading.Thread(target=call) for _ in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(90)
    out.put((ids, len(published)))
