"""A bare Celery app for ``bench/bench_celery_settings.py``: no framework code at all.

``BENCH_SETTINGS=defaults`` is Celery out of the box (acknowledged on receipt,
prefetch 4, no result backend); ``framework`` is the framework's delivery and
result settings (see ``app/core/background/celery_app.py``).
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery("bench_raw", broker=os.environ["BENCH_BROKER"])
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
if os.environ.get("BENCH_SETTINGS") == "framework":
    app.conf.update(
        result_backend=os.environ["BENCH_BACKEND"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_extended=True,
    )


@app.task(name="bench_raw.noop")
def noop(i: int) -> None:
    """Nothing: the cost measured is Celery's own."""
