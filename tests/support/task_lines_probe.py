"""Included by a test worker: says whenever Celery builds its success record, and for which task.

A filter on Celery's ``celery.app.trace`` logger sees every record Celery
makes there, before any handler (and before the framework's handler filter
drops the framework tasks' ones). It prints one marker line per success
record. ``probe.plain`` is a plain Celery task of the same app: its record
shows the probe works.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery.app.trace import LOG_SUCCESS

from app.core.background import TaskContext, celery_app, simple_task

MARKER = "PROBE: success record built for"


class _SuccessRecordProbe(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == LOG_SUCCESS and isinstance(record.args, dict):
            print(f"{MARKER} {record.args.get('name')}", file=sys.stderr, flush=True)
        return True


logging.getLogger("celery.app.trace").addFilter(_SuccessRecordProbe())


@simple_task(name="probe.framework")
async def framework_task(ctx: TaskContext, n: int) -> int:
    return n


@celery_app.task(name="probe.plain")
def plain_task(n: int) -> Any:
    return n
