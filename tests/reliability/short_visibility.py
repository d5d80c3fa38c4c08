"""Imported by a test worker (``--include``): a 10 s Redis visibility timeout.

The framework refuses ``CELERY_VISIBILITY_TIMEOUT`` below its longest task
time limit (1,860 s for ``long_running``), because Redis would deliver a
still-running task a second time. The fault tests run only short tasks, so
this worker may use 10 s and show redelivery after a crash in seconds instead
of an hour. It changes the worker's configuration before its consumer connects.

kombu sweeps for expired messages every ``unacked_restore_interval`` (10 s)
times ``unacked_restore_throttle`` (10) seconds: 100 s by default, so the sweep
is made every second here too.
"""

from __future__ import annotations

import os

from app.core.background import celery_app

# A test whose tasks die at once (nothing runs long) may ask for less.
VISIBILITY_TIMEOUT = int(os.environ.get("TEST_VISIBILITY_TIMEOUT", "10"))

celery_app.conf.broker_transport_options = {
    **(celery_app.conf.broker_transport_options or {}),
    "visibility_timeout": VISIBILITY_TIMEOUT,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}
