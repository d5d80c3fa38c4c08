"""Shared pieces of the fault tests: private services to break, and the tally.

The shared Redis, RabbitMQ and PostgreSQL of this machine are never stopped:
a test that restarts a broker or a database starts its own private instance on
a free port (``PrivateRedis``, ``PrivatePostgres``) or uses a private RabbitMQ
virtual host (``RabbitVhost``), and removes it at the end.

Every fault test runs tasks that record their completion in PostgreSQL with
``INSERT ... ON CONFLICT DO UPDATE SET completions = completions + 1``: one
row per task, so a lost task has no row and a task completed twice has 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from kombu import Connection

from app.core.background.internals.operations.worker_process import WorkerProcess
from tests.support.redis_server import RedisServer, free_port
from tests.support.services import RABBITMQ_URL

# The tasks of these tests, and a module that shortens Redis's visibility timeout.
RELIABILITY_TASKS = "tests.support.tasks_reliability"
SHORT_VISIBILITY = "tests.reliability.short_visibility"

COMPLETIONS_TABLE = """
CREATE TABLE IF NOT EXISTS reliability_completions (
    key text PRIMARY KEY,
    completions integer NOT NULL,
    attempts text NOT NULL DEFAULT ''
)
"""


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# -- the tally ------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """What happened to a run of tasks, read from the completions table."""

    scenario: str
    sent: int
    completed: int
    lost: int
    twice: int

    def line(self) -> str:
        return (
            f"[reliability] {self.scenario}: sent={self.sent} completed={self.completed} "
            f"lost={self.lost} completed_twice={self.twice}"
        )


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def create_completions_table(dsn: str) -> None:
    async def create() -> None:
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            await connection.execute(COMPLETIONS_TABLE)
        finally:
            await connection.close()

    _run(create())


def completions(dsn: str, prefix: str) -> dict[str, int]:
    """``{key: completions}`` for the keys of one run."""

    async def read() -> dict[str, int]:
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            rows = await connection.fetch(
                "SELECT key, completions FROM reliability_completions WHERE key LIKE $1",
                prefix + "%",
            )
        finally:
            await connection.close()
        return {row["key"]: row["completions"] for row in rows}

    return dict(_run(read()))


def tally(scenario: str, dsn: str, keys: Sequence[str], prefix: str) -> Tally:
    done = completions(dsn, prefix)
    result = Tally(
        scenario=scenario,
        sent=len(keys),
        completed=sum(1 for key in keys if done.get(key, 0) >= 1),
        lost=sum(1 for key in keys if key not in done),
        twice=sum(1 for key in keys if done.get(key, 0) >= 2),
    )
    print(result.line())
    return result


def wait_all_completed(dsn: str, prefix: str, count: int, timeout: float) -> bool:
    return wait_until(lambda: len(completions(dsn, prefix)) >= count, timeout, interval=0.25)


def run_keys(count: int) -> tuple[str, list[str]]:
    """A unique prefix for one run, and its task keys."""
    prefix = f"r{uuid.uuid4().hex[:10]}-"
    return prefix, [f"{prefix}{i:05d}" for i in range(count)]


def completed_count(dsn: str, prefix: str) -> int:
    async def read() -> int:
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            return int(
                await connection.fetchval(
                    "SELECT count(*) FROM reliability_completions WHERE key LIKE $1",
                    prefix + "%",
                )
            )
        finally:
            await connection.close()

    return int(_run(read()))


class TaskRun:
    """One run of ``count`` completion tasks: send them, watch them, tally them."""

    def __init__(
        self,
        scenario: str,
        broker_url: str,
        dsn: str,
        count: int,
        hold: float,
        *,
        with_task_ids: bool = False,
    ) -> None:
        self.scenario, self.broker_url, self.dsn, self.hold = scenario, broker_url, dsn, hold
        self.prefix, self.keys = run_keys(count)
        # Dispatched with a task_id each (deduplicated, and run once by the worker).
        self.with_task_ids = with_task_ids
        # Keys whose task writes its pool process's pid to a file, then holds.
        self.pid_files: dict[str, Path] = {}
        self.marker_hold = 0.0
        # Marked keys whose task commits its completion before it announces and holds.
        self.commit_first: set[str] = set()

    def mark(
        self,
        positions: Sequence[int],
        pid_dir: Path,
        hold: float = 3.0,
        *,
        after_commit: bool = False,
    ) -> list[Path]:
        """Make the tasks at ``positions`` announce their pid, then hold ``hold`` seconds.

        A test that must kill a pool process *while it runs a task* kills the pid
        a marked task wrote: a child killed between two tasks proves nothing.
        ``after_commit``: the task commits its completion first (see ``complete``).
        """
        self.marker_hold = hold
        files = []
        for position in positions:
            key = self.keys[position]
            self.pid_files[key] = pid_dir / f"{key}.pid"
            files.append(self.pid_files[key])
            if after_commit:
                self.commit_first.add(key)
        return files

    def send(
        self,
        keys: Sequence[str] | None = None,
        *,
        ignore_result: bool = True,
        transport: type | None = None,
    ) -> None:
        """Send the tasks of ``keys`` (default: all of this run's)."""
        from tests.support.tasks_reliability import complete

        calls = (self._call(key) for key in (self.keys if keys is None else keys))
        send(
            self.broker_url, complete, calls,
            with_task_ids=self.with_task_ids, ignore_result=ignore_result, transport=transport,
        )  # fmt: skip

    def _call(self, key: str) -> dict[str, Any]:
        pid_file = self.pid_files.get(key)
        if pid_file is None:
            return {"key": key, "hold": self.hold}
        call = {"key": key, "hold": self.marker_hold, "pid_file": str(pid_file)}
        return {**call, "commit_first": True} if key in self.commit_first else call

    def completed(self) -> int:
        return completed_count(self.dsn, self.prefix)

    def wait_completed(self, at_least: int, timeout: float) -> bool:
        return wait_until(lambda: self.completed() >= at_least, timeout, interval=0.1)

    def wait_all(self, timeout: float) -> bool:
        return self.wait_completed(len(self.keys), timeout)

    def tally(self) -> Tally:
        return tally(self.scenario, self.dsn, self.keys, self.prefix)


# -- sending ----------------------------------------------------------------


def send(
    broker_url: str,
    task: Any,
    kwargs_list: Iterable[Mapping[str, Any]],
    *,
    with_task_ids: bool = False,
    ignore_result: bool = True,
    transport: type | None = None,
) -> int:
    """Publish one message per kwargs to ``broker_url`` through one connection.

    ``with_task_ids``: each with ``task_id=complete-{key}`` (a dedup lease in
    this run's Redis, and the worker's run-once check). ``transport``: a kombu
    transport class (default: kombu's own for the URL, as a foreign
    client would publish).
    """
    sent = 0
    with Connection(broker_url, transport=transport) as connection:
        producer = connection.Producer()
        for kwargs in kwargs_list:
            task_id = f"complete-{kwargs['key']}" if with_task_ids else None
            task.apply_async(
                kwargs=dict(kwargs),
                producer=producer,
                ignore_result=ignore_result,
                task_id=task_id,
            )
            sent += 1
    return sent


# -- workers ----------------------------------------------------------------


def reliability_worker(
    broker_url: str,
    database_url: str,
    *,
    result_backend: str | None = None,
    short_visibility: bool = False,
    pool: str = "prefork",
    concurrency: int = 2,
    extra_env: Mapping[str, str] | None = None,
) -> WorkerProcess:
    env = {
        "CELERY_BROKER_URL": broker_url,
        "CELERY_RESULT_BACKEND": result_backend or broker_url,
        "DATABASE_URL": database_url,
        "BACKGROUND_RETRY_DELAY_SCALE": "0.01",
        **(extra_env or {}),
    }
    include = [RELIABILITY_TASKS, *([SHORT_VISIBILITY] if short_visibility else [])]
    return WorkerProcess(env, pool=pool, concurrency=concurrency, include=include)


def pool_children(worker: WorkerProcess) -> list[int]:
    """The pids of a prefork worker's pool processes."""
    path = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
    with contextlib.suppress(OSError):
        return [int(pid) for pid in path.read_text().split()]
    return []


def kill_the_child_running(pid_file: Path, timeout: float = 60) -> int | None:
    """SIGKILL the pool process that wrote ``pid_file`` (a marked task, mid-hold)."""
    if not wait_until(pid_file.exists, timeout, interval=0.02):
        return None
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    return pid


def kill_one_child(worker: WorkerProcess) -> int | None:
    children = pool_children(worker)
    if not children:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(children[0], signal.SIGKILL)
    return children[0]


# -- a private Redis ------------------------------------------------------


class PrivateRedis(RedisServer):
    """A durable redis-server of a test's own, to restart or to guard with a password."""

    def __init__(self, password: str | None = None) -> None:
        super().__init__(password=password, durable=True)


# -- a private PostgreSQL cluster -------------------------------------------


def _postgres_bin() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return candidates[-1].parent if candidates else None


PORT_ATTEMPTS = 3


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (initdb + pg_ctl as user postgres) on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bgtest-pg-"))
        self.data = self.dir / "data"
        self.bin = _postgres_bin()

    @property
    def available(self) -> str | None:
        if self.bin is None:
            return "no PostgreSQL server binaries under /usr/lib/postgresql"
        if os.geteuid() != 0 and os.environ.get("USER") != "postgres":
            return "a private PostgreSQL cluster needs root (to run as postgres)"
        return None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command: str, timeout: float = 60) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*prefix, *command], check=True, timeout=timeout, capture_output=True, text=True
        )

    def start(self) -> PrivatePostgres:
        assert self.bin is not None
        if not self.data.exists():
            shutil.chown(self.dir, "postgres") if os.geteuid() == 0 else None
            self._as_postgres(
                str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                "--no-sync",
            )  # fmt: skip
        # The port was free when chosen, but another process may bind it first:
        # then pg_ctl fails and we start again on another one.
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._pg_ctl("start", "-w")
                return self
            except subprocess.CalledProcessError:
                log = self.dir / "server.log"
                text = log.read_text(errors="replace") if log.exists() else ""
                if "could not bind" not in text or attempt == PORT_ATTEMPTS - 1:
                    raise
                self.port = free_port()
        return self

    def _pg_ctl(self, action: str, *extra: str) -> None:
        assert self.bin is not None
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=50"
        )
        self._as_postgres(
            str(self.bin / "pg_ctl"), action, "-D", str(self.data), "-o", options,
            "-l", str(self.dir / "server.log"), *extra,
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._pg_ctl("stop", "-m", "immediate", "-w")

    def restart(self, down_for: float = 1.0) -> None:
        """Stop fast (connections are cut), stay down a moment, start again."""
        self._pg_ctl("stop", "-m", "fast", "-w")
        time.sleep(down_for)
        self._pg_ctl("start", "-w")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- a private RabbitMQ virtual host ------------------------------------------


class RabbitVhost:
    """A virtual host of our own on the shared RabbitMQ, deleted at the end.

    Queues in it are invisible to every other test run. A RabbitMQ node of our
    own is impractical here, so "the broker restarts" is played by closing every
    connection of this virtual host (``rabbitmqctl close_all_connections``):
    the clients see exactly what a node restart shows them, a dropped
    connection, and the queues (durable) keep their messages as they would.
    """

    def __init__(self) -> None:
        self.name = f"bgtest_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    @property
    def url(self) -> str:
        scheme, rest = RABBITMQ_URL.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}/{self.name}"

    @staticmethod
    def available() -> str | None:
        if shutil.which("rabbitmqctl") is None:
            return "rabbitmqctl is not installed"
        return None

    def _ctl(self, *args: str) -> str:
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args], check=True, timeout=60, capture_output=True, text=True
        )
        return done.stdout

    def create(self) -> RabbitVhost:
        self._ctl("add_vhost", self.name)
        self._ctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def close_connections(self) -> None:
        self._ctl("close_all_connections", "-p", self.name, "bgtest: simulated broker restart")

    def queue_depth(self, queue: str = "default") -> int:
        for line in self._ctl("list_queues", "-p", self.name, "name", "messages").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return int(parts[1])
        return 0

    def delete(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._ctl("delete_vhost", self.name)


@contextlib.contextmanager
def rabbit_vhost() -> Iterator[RabbitVhost]:
    vhost = RabbitVhost().create()
    try:
        yield vhost
    finally:
        vhost.delete()
