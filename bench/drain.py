"""Drain throughput: how fast a set of workers empties a queue of N tasks.

The workers start idle (consuming only ``low_priority``), N messages are put
in ``default``, then every worker of the set is told to consume ``default``
at once (Celery's ``add_consumer`` broadcast) and the queue is watched until
it is empty and nothing is left unacknowledged. Workers stay up between
rounds (``cancel_consumer`` after each), so start-up time is never measured
and both sides of a comparison can alternate round by round.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from celery.utils import uuid
from kombu import Connection

from app.core.background import celery_app
from app.core.background.internals.operations.worker_process import CELERY_APP, WorkerProcess

IDLE_QUEUE = "low_priority"
QUEUE = "default"
PAUSE_SETTLE = 1.5


@dataclass
class Topology:
    """A set of workers: ``count`` processes of ``pool`` with ``concurrency`` each."""

    label: str
    pool: str = "prefork"
    concurrency: int = 2
    count: int = 1
    extra_args: Sequence[str] = ()
    # Added to the workers' environment (e.g. the custom pool of ``-P custom``).
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class WorkerSet:
    """``topology``'s workers: the framework's app, or ``app`` (``-A``, e.g. raw Celery's)."""

    topology: Topology
    broker_url: str
    env: Mapping[str, str]
    workers: list[WorkerProcess] = field(default_factory=list)
    app: str | None = None
    queues: Sequence[str] = (IDLE_QUEUE,)

    @property
    def destinations(self) -> list[str]:
        host = socket.gethostname()
        return [worker.name.replace("%h", host) for worker in self.workers]

    def start(self) -> WorkerSet:
        for _ in range(self.topology.count):
            worker = WorkerProcess(
                {**self.env, **self.topology.env},
                pool=self.topology.pool,
                concurrency=self.topology.concurrency,
                queues=self.queues,
                # The framework's bench tasks; another app brings its own tasks.
                include=("bench.tasks",) if self.app is None else (),
                loglevel="INFO",
                extra_args=self.topology.extra_args,
            )
            if self.app is not None:
                worker.command[worker.command.index(CELERY_APP)] = self.app
            self.workers.append(worker.start())
        return self

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every worker's process group (its pool processes too)."""
        for worker in self.workers:
            os.killpg(worker.pid, signum)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by these workers and their pool processes.

        Unlike a drain rate, it does not depend on what else the machine is
        running: on a shared machine it is the steadier measure of a task's cost.
        """
        total = 0.0
        for worker in self.workers:
            children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
            total += sum(_cpu_seconds(pid) for pid in (worker.pid, *map(int, children)))
        return total

    def _control(self, method: str) -> None:
        # A busy or slow machine can lose a broadcast reply: ask again (both
        # commands are idempotent) before giving up.
        replies: list[Any] = []
        control = _control_app(self.broker_url).control
        for _ in range(3):
            replies = getattr(control, method)(
                QUEUE, destination=self.destinations, reply=True, timeout=5
            )
            if len(replies) == len(self.workers):
                return
        raise RuntimeError(
            f"{method} on {self.topology.label}: {len(replies)} of {len(self.workers)} replied"
        )

    def consume(self) -> None:
        self._control("add_consumer")

    def pause(self) -> None:
        self._control("cancel_consumer")
        # The worker replies before it cancels, and a BRPOP already waiting
        # (up to 1 s on Redis) would still take the next message: let both pass.
        time.sleep(PAUSE_SETTLE)


def _cpu_seconds(pid: int) -> float:
    # Fields 14 and 15 of /proc/PID/stat (after the command name): utime, stime.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@functools.cache
def _control_app(broker_url: str) -> Celery:
    """A Celery app on ``broker_url`` for remote control.

    Passing ``connection=`` to ``control.add_consumer`` is not enough: kombu's
    mailbox publishes through the app's own producer pool, i.e. the app's
    broker, and only waits for replies on the given connection.
    """
    app = Celery("bench-control", set_as_current=False)
    # CELERY_BROKER_URL (set for the workers) would win over broker_url.
    app.conf.update(
        broker_read_url=broker_url,
        broker_write_url=broker_url,
        accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
    )
    return app


def fill(broker_url: str, task_name: str, calls: Iterable[Mapping[str, Any]]) -> int:
    """Put one message per call in ``default``, through one connection (pipelined on Redis)."""
    amqp = celery_app.amqp
    sent = 0
    with Connection(broker_url) as connection:
        producer = amqp.Producer(connection)
        batch = getattr(producer, "batch", None)
        with batch(max_size=500) if batch else _null():
            for kwargs in calls:
                message = amqp.create_task_message(
                    uuid(), task_name, (), dict(kwargs), reply_to=celery_app.thread_oid
                )
                queue = amqp.queues[QUEUE]
                amqp.send_task_message(
                    producer, task_name, message, queue=queue, exchange=queue.exchange,
                    routing_key=queue.routing_key, declare=[queue],
                )  # fmt: skip
                sent += 1
    return sent


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def redis_backlog(client: Any) -> Callable[[], int]:
    def backlog() -> int:
        pipe = client.pipeline(transaction=False)
        pipe.llen(QUEUE)
        pipe.hlen("unacked")
        waiting, unacked = pipe.execute()
        return int(waiting) + int(unacked)

    return backlog


def rabbit_backlog(broker_url: str) -> tuple[Callable[[], int], Callable[[], None]]:
    """Messages ready in ``default`` (RabbitMQ does not count the few unacknowledged)."""
    connection = Connection(broker_url)
    channel = connection.channel()

    def backlog() -> int:
        return int(channel.queue_declare(queue=QUEUE, passive=True).message_count)

    return backlog, connection.release


def drain(workers: WorkerSet, backlog: Callable[[], int], count: int, timeout: float) -> float:
    """Tasks per second while ``workers`` empty a queue holding ``count`` messages."""
    # RabbitMQ counts published messages a moment after the publish returns.
    deadline = time.monotonic() + 30
    while (held := backlog()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the queue holds {held} messages, not {count}")
        time.sleep(0.05)
    workers.consume()
    deadline = time.monotonic() + timeout
    started = None
    try:
        while time.monotonic() < deadline:
            left = backlog()
            now = time.perf_counter()
            if started is None and left < count:
                started = now
            if left == 0:
                assert started is not None
                return count / (now - started)
            time.sleep(0.005)
        raise RuntimeError(f"queue not drained in {timeout}s ({backlog()} left)")
    finally:
        workers.pause()
