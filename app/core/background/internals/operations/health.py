"""Liveness and readiness of each process type, for ``python -m app.core.background health``.

Every check returns a ``Verdict``: passed or not, and one line saying why.
Liveness asks "is the process alive and does its loop turn?" from what the
process itself leaves behind (a heartbeat), or from a round trip to it;
readiness asks "can it do its work?": the services it needs answer. What each
process type's checks are is the CLI's choice (``console/health_cli.py``);
these are the pieces, each bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from celery import Celery
from sqlalchemy import text

from ..logging import mask_url_passwords
from ..session import DatabaseConfig, create_engine
from ..transport.result_backend import AtomicRedisBackend
from .heartbeat_file import heartbeat_age
from .running import HEARTBEAT_KEY
from .running_book import book_of


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str


def file_heartbeat(path: Path, max_age: float, what: str) -> Verdict:
    """A relay's or beat's heartbeat file, touched at most ``max_age`` seconds ago."""
    age = heartbeat_age(path)
    if age is None:
        return Verdict(False, f"{what}: no heartbeat file {path} (not running, or stopped)")
    if age > max_age:
        return Verdict(False, f"{what}: heartbeat {age:.0f}s old (limit {max_age:g}s): {path}")
    return Verdict(True, f"{what}: heartbeat {age:.1f}s old")


def worker_heartbeat(app: Celery, hostname: str, max_age: float) -> Verdict:
    """The worker main process's heartbeat in the result backend (``running.py``)."""
    backend = app.backend
    book = book_of(app)
    beat_at: float | None
    if isinstance(backend, AtomicRedisBackend):
        raw = backend.client.hget(HEARTBEAT_KEY, hostname)
        beat_at = float(raw) if raw is not None else None
    elif book is not None:
        beat_at = book.read(0)[1].get(hostname)
    else:
        return Verdict(False, f"worker {hostname}: this result backend keeps no heartbeats")
    if beat_at is None:
        return Verdict(False, f"worker {hostname}: no heartbeat (not running, or stopped)")
    age = max(time.time() - beat_at, 0.0)
    if age > max_age:
        return Verdict(False, f"worker {hostname}: heartbeat {age:.0f}s old (limit {max_age:g}s)")
    return Verdict(True, f"worker {hostname}: heartbeat {age:.1f}s old")


def worker_ping(app: Celery, hostname: str, timeout: float) -> Verdict:
    """A ``celery inspect ping`` to ``hostname`` only: its consumer is connected and turns."""
    replies = app.control.ping(destination=[hostname], timeout=timeout) or []
    if any(hostname in reply for reply in replies):
        return Verdict(True, f"worker {hostname}: answered a ping")
    return Verdict(False, f"worker {hostname}: no answer to a ping within {timeout:g}s")


def broker_connects(app: Celery, timeout: float) -> Verdict:
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=math.ceil(timeout))
        transport = connection.transport_cls
    return Verdict(True, f"broker ({transport}) connects")


def database_answers(url: str, timeout: float) -> Verdict:
    async def select_one() -> None:
        engine = create_engine(DatabaseConfig(url=url, pool_size=1))
        try:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        finally:
            await engine.dispose()

    asyncio.run(asyncio.wait_for(select_one(), timeout))
    return Verdict(True, "database answers")


def http_status(url: str, timeout: float) -> int:
    """The HTTP status ``GET url`` answers with (an error status included)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status


def guarded(name: str, check: Callable[[], Verdict]) -> Verdict:
    """``check``'s verdict; an exception (a refused connection, a timeout) fails it, named."""
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - the probe's answer is the failure, not a traceback
        # The type and the message on one line, any URL's password masked.
        message = mask_url_passwords(" ".join(str(exc).split()))[:200]
        return Verdict(False, f"{name}: {type(exc).__name__}: {message}".rstrip(": "))


def wait_for_verdict(check: Callable[[], Verdict], wait: float, interval: float = 1.0) -> Verdict:
    """``check`` again every ``interval`` until it passes or ``wait`` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        verdict = check()
        if verdict.ok or time.monotonic() >= deadline:
            return verdict
        time.sleep(interval)
