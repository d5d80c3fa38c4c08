"""Running and stuck tasks, queue depths: read from what the framework keeps, not by asking workers.

* Running tasks: the Redis result backend keeps the keys of started tasks in
  a sorted set scored by start time (``transport/result_backend.py`` adds and
  removes them in the same script that writes the state). One ``ZRANGE`` and
  one ``MGET`` give every running task with its worker, process and attempt.
* Worker heartbeats: each worker's main process writes the time into a hash
  every ``HEARTBEAT_INTERVAL`` seconds (``WorkerHeartbeat``), so a page load
  reads one ``HGETALL`` instead of a broadcast to every worker.
* A running task is stuck when it has run past its hard time limit (its
  worker should have ended it), or when its worker has not been heard from
  for ``SILENT_AFTER`` seconds (the process or host is gone; the broker will
  deliver the message again after its visibility timeout).
* Queue depths: a passive declare per queue, on any broker kombu supports.

A database result backend (the embedded default) keeps the same in two
tables, written at each run's start and end (``running_book.py``). Other
result backends keep no running set: ``running_tasks`` returns None.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from celery import Celery, states
from kombu.exceptions import ChannelError, OperationalError

from ..transport.result_backend import RUNNING_KEY, AtomicRedisBackend
from .running_book import BookedRun, book_of

HEARTBEAT_KEY = "background:worker-heartbeats"
HEARTBEAT_INTERVAL = 10.0
# Three heartbeats missed: the worker is gone (or cannot reach Redis).
SILENT_AFTER = 3 * HEARTBEAT_INTERVAL
# The most running tasks one reading returns (the oldest first).
MAX_LISTED = 500


@dataclass(frozen=True, slots=True)
class RunningTask:
    task_id: str
    task_name: str | None
    state: str
    worker: str | None
    pid: int | None
    attempt: int | None
    queue: str | None
    started_at: float
    running_for: float
    stuck: bool
    stuck_reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def running_tasks(app: Celery, now: float | None = None) -> list[RunningTask] | None:
    """The running tasks, oldest first, stuck ones flagged; None if the backend keeps no set."""
    now = time.time() if now is None else now
    backend = app.backend
    book = book_of(app)
    if isinstance(backend, AtomicRedisBackend):
        runs, beats = _read_redis(backend)
    elif book is not None:
        runs, beats = book.read(MAX_LISTED)
    else:
        return None
    return [_running(app, run, now, beats) for run in runs]


def _read_redis(backend: AtomicRedisBackend) -> tuple[list[BookedRun], dict[str, float]]:
    """The runs of the running set (``ZRANGE`` + ``MGET``) and the heartbeats (``HGETALL``)."""
    client = backend.client
    entries: list[tuple[bytes, float]] = client.zrange(
        RUNNING_KEY, 0, MAX_LISTED - 1, withscores=True
    )
    if not entries:
        return [], {}
    metas = client.mget([key for key, _ in entries])
    beats = {_text(name): float(value) for name, value in client.hgetall(HEARTBEAT_KEY).items()}
    runs: list[BookedRun] = []
    ended: list[bytes] = []
    for (key, started_at), raw in zip(entries, metas, strict=True):
        meta = backend.decode(raw) if raw else None
        if not isinstance(meta, Mapping) or meta.get("status") not in (states.STARTED, "PROGRESS"):
            ended.append(key)  # expired, or a state written without the script
            continue
        # STARTED's result is Celery's {"pid", "hostname"}; PROGRESS's is the metrics.
        result = meta.get("result") if meta.get("status") == states.STARTED else None
        result = result if isinstance(result, Mapping) else {}
        worker = meta.get("worker") or result.get("hostname")
        name = meta.get("name")
        retries = meta.get("retries")
        runs.append(
            BookedRun(
                task_id=str(meta.get("task_id")),
                task_name=name if isinstance(name, str) else None,
                worker=str(worker) if worker is not None else None,
                pid=int(result["pid"]) if "pid" in result else None,
                attempt=int(retries) if retries is not None else None,
                queue=meta.get("queue"),
                started_at=started_at,
                state=str(meta.get("status")),
            )
        )
    if ended:
        client.zrem(RUNNING_KEY, *ended)
    return runs, beats


def _running(app: Celery, run: BookedRun, now: float, beats: Mapping[str, float]) -> RunningTask:
    task = app.tasks.get(run.task_name) if run.task_name is not None else None
    hard_limit = getattr(task, "time_limit", None) or app.conf.task_time_limit
    running_for = max(now - run.started_at, 0.0)
    reason = None
    if hard_limit and running_for > float(hard_limit):
        reason = f"running for {running_for:.0f}s, past its hard time limit ({hard_limit}s)"
    elif run.worker is not None and now - beats.get(run.worker, 0.0) > SILENT_AFTER:
        reason = f"its worker {run.worker} has not been heard from for over {SILENT_AFTER:.0f}s"
    return RunningTask(
        task_id=run.task_id,
        task_name=run.task_name,
        state=run.state.lower(),
        worker=run.worker,
        pid=run.pid,
        attempt=run.attempt,
        queue=run.queue,
        started_at=run.started_at,
        running_for=running_for,
        stuck=reason is not None,
        stuck_reason=reason,
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class WorkerHeartbeat:
    """Writes this worker's time where the running set is kept, while it runs (main process only).

    The Redis result backend: a hash (``HEARTBEAT_KEY``); a database result
    backend: ``background_worker_heartbeats`` (``running_book.py``).
    """

    def __init__(self, app: Celery, hostname: str, interval: float = HEARTBEAT_INTERVAL) -> None:
        self._app, self._hostname, self._interval = app, hostname, interval
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat: Callable[[float], None] | None = None
        self._forget: Callable[[], None] | None = None

    def _connect(self) -> bool:
        """Pick the store (Redis hash or database table); False when the backend keeps none."""
        backend = self._app.backend
        book = book_of(self._app)
        if isinstance(backend, AtomicRedisBackend):
            client, hostname = backend.client, self._hostname
            self._beat = lambda now: client.hset(HEARTBEAT_KEY, hostname, repr(now))
            self._forget = lambda: client.hdel(HEARTBEAT_KEY, hostname)
        elif book is not None:
            self._beat = partial(book.beat, self._hostname)
            self._forget = partial(book.forget_worker, self._hostname)
        else:
            return False
        return True

    def start(self) -> None:
        if not self._connect():
            return
        self._thread = threading.Thread(target=self._run, name="background-heartbeat", daemon=True)
        self._thread.start()

    def clear(self) -> None:
        """Remove a heartbeat left under this name by a worker that was killed.

        Called as the worker starts: until its own first beat (once it
        consumes), the name has none, so a health check cannot take the dead
        predecessor's recent beat for this worker's.
        """
        if self._connect() and self._forget is not None:
            # The store not answering yet: the check sees the old beat age instead.
            with contextlib.suppress(Exception):
                self._forget()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._forget is not None:
            with contextlib.suppress(Exception):
                self._forget()

    def _run(self) -> None:
        assert self._beat is not None
        while not self._stopped.is_set():
            # The store restarting: the next beat tries again (a long silence shows as stuck).
            with contextlib.suppress(Exception):
                self._beat(time.time())
            self._stopped.wait(self._interval)


def queue_depths(app: Celery) -> dict[str, int | None]:
    """Messages waiting in each of the app's queues (None: the broker does not know the queue)."""
    names = [queue.name for queue in app.conf.task_queues or ()]
    depths: dict[str, int | None] = {}
    with app.connection_for_read() as connection:
        # Redis deletes a list when its last message is taken: there an empty
        # queue and a missing one look alike, and both hold nothing. Only an
        # AMQP broker knows a queue that no worker has declared yet.
        missing = None if connection.transport.driver_type == "amqp" else 0
        channel: Any = connection.default_channel
        for name in names:
            try:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except (ChannelError, OperationalError):
                depths[name] = missing
                # RabbitMQ closes the channel on a passive declare of a missing queue.
                channel = connection.channel()
    return depths
