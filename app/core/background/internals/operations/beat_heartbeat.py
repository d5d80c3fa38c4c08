"""``celery beat``'s scheduler with a heartbeat file: its liveness for the health command.

Celery's ``PersistentScheduler`` (the schedule file, every behaviour kept),
touching ``BEAT_FILE`` in the app's ``background_heartbeat_dir`` at each tick
and removing it when beat stops cleanly. The build of the Celery app names it
as ``beat_scheduler``, so every ``celery -A app.core.background.celery_app
beat`` uses it; ``-S``/``--scheduler`` still picks another (then no heartbeat).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery.beat import PersistentScheduler

from .heartbeat_file import BEAT_FILE, FileHeartbeat

# The longest beat sleeps between two ticks (Celery's default is 300 s). A tick
# with nothing due costs a heap peek; this bounds the heartbeat's age, which the
# health check compares with its limit (3 x this by default).
BEAT_MAX_INTERVAL = 10


class HeartbeatScheduler(PersistentScheduler):
    """``PersistentScheduler`` that touches its heartbeat file at every tick."""

    max_interval = BEAT_MAX_INTERVAL

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        folder = app.conf.get("background_heartbeat_dir")
        self._heartbeat = FileHeartbeat(Path(folder) / BEAT_FILE) if folder else None
        super().__init__(app, *args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if self._heartbeat is not None:
            self._heartbeat.beat()
        interval: float = super().tick(*args, **kwargs)
        return interval

    def close(self) -> None:
        super().close()
        if self._heartbeat is not None:
            self._heartbeat.remove()
