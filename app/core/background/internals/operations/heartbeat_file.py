"""Heartbeat files of the processes that keep no heartbeat in a shared store: relay and beat.

A worker's main process writes its heartbeat where the running set lives
(``running.py``); the outbox relay and ``celery beat`` have no such place, and
their health needs only the host they run on, so each touches a file once per
turn of its loop. The file's modification time is the heartbeat: reading it
costs one ``stat``, and a process that stops turning (hung, or gone) leaves it
to age. A clean stop removes it, so the health check fails at once instead of
after the file has aged past its limit.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

RELAY_FILE = "relay.heartbeat"
BEAT_FILE = "beat.heartbeat"


class FileHeartbeat:
    """Touches ``path`` at each turn of a process's loop; removes it at a clean stop."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def beat(self) -> None:
        # Best effort: a full or read-only disk shows as a stale heartbeat, which
        # is what the health check should then report; the loop itself goes on.
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # On an existing file: its modification time set to now.
            self.path.touch()

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)


def heartbeat_age(path: Path, now: float | None = None) -> float | None:
    """Seconds since ``path`` was last touched; None when there is no such file."""
    try:
        modified = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return max((time.time() if now is None else now) - modified, 0.0)
