"""The I/O-bound jobs of issue 14: tasks that await, side by side with their peers.

Two jobs, every side in the same run:

- ``sleep``: ``await asyncio.sleep(0.1)`` (``--io-tasks``, 5,000 by default);
- ``pg_sleep``: ``SELECT pg_sleep(0.05)`` through ``ctx.session`` in a
  ``@db_task`` (``--io-db-tasks``, 2,000), pool ``--pg-pool`` + 10 overflow
  per process on every side.

Sides (``SIDES`` below): the framework's workers as ``scripts/worker.sh``
starts them (prefork, 2 processes with concurrency 1) and with ``-P threads``
at 16 and 100 per process (2 processes); raw Celery (``bench/celery_settings_app.py``,
the framework's delivery settings, no framework code) with threads at 16 and
100; and the async-native peers (``bench/peers/``) at 16 and 100 per process,
2 processes. The framework's concurrent async mode joins them: ``-P custom``
with ``CELERY_CUSTOM_WORKER_POOL`` set to ``--async-pool`` (by default
``app.core.background.pool:AsyncioPool``) at 16 and 100 per process; where
that pool does not import, its sides are skipped with a note.

How a drain is timed, the same for every side: the side's worker processes
are started and warmed up, then stopped with SIGSTOP (their whole process
groups), the tasks are queued, SIGCONT lets them go, and the clock runs from
SIGCONT until nothing is queued or unacknowledged. Each round starts every
side afresh (a side's idle workers and database connections are gone before
the next side starts: two sides at 100 connections each would not fit
PostgreSQL's ``max_connections``), in an order that rotates round by round.

Reported per side: tasks/s, its ceiling (processes x concurrency / task
latency; for ``pg_sleep`` the concurrency is capped by the engine pool), the
fraction of the ceiling reached, and the workers' CPU time per task. A side
whose ceiling is low drains fewer tasks (``--io-max-seconds`` at its ceiling,
at least 200): prefork's 20 tasks/s would take over four minutes a round for
5,000.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench import async_mode
from bench.drain import Topology, WorkerSet, fill, redis_backlog
from bench.environment import BenchServices
from bench.report import Figure, Report

PEER_BROKER_DB, PEER_RESULT_DB = 2, 3
# max_overflow of every engine: SQLAlchemy's default, which the framework keeps.
POOL_OVERFLOW = 10
PEER_PACKAGES = {"taskiq": ("taskiq", "taskiq_redis"), "saq": ("saq",), "dramatiq": ("dramatiq",)}
# Processes a peer runs besides its workers (a supervisor).
PEER_SUPERVISORS = {"taskiq": 1, "saq": 0, "dramatiq": 1}
RAW_APP = "bench.celery_settings_app"
STALL_SECONDS = 60


@dataclass(frozen=True)
class Job:
    key: str
    seconds: float
    framework_task: str
    raw_task: str
    uses_db: bool

    def describe(self) -> str:
        if self.uses_db:
            return f"SELECT pg_sleep({self.seconds}) via ctx.session"
        return f"await asyncio.sleep({self.seconds})"


SLEEP = Job("sleep", 0.1, "bench.sleep", "bench_raw.sleep", uses_db=False)
PG_SLEEP = Job("pg_sleep", 0.05, "bench.pg_sleep", "bench_raw.pg_sleep", uses_db=True)


# -- the sides -------------------------------------------------------------------

# (label, pool, concurrency per process, processes): the framework's workers.
FRAMEWORK_SIDES: list[Topology] = [
    Topology("framework, scripts/worker.sh (2 x prefork c=1)", "prefork", 1, 2),
    Topology("framework, 2 x -P threads -c 16", "threads", 16, 2),
    Topology("framework, 2 x -P threads -c 100", "threads", 100, 2),
]
# The framework's concurrent async execution mode (issue 14): ``-P custom``
# with the asyncio pool (``--async-pool``, ``bench/async_mode.py``) at each of
# these concurrencies per process, 2 processes, beside the sides above.
ASYNC_MODE_CONCURRENCY = (16, 100)
RAW_SIDES: list[Topology] = [
    Topology("raw Celery, 2 x -P threads -c 16", "threads", 16, 2),
    Topology("raw Celery, 2 x -P threads -c 100", "threads", 100, 2),
]
PEER_CONCURRENCY = (16, 100)
PEER_PROCESSES = 2


def async_mode_sides(pool: str | None) -> list[Topology]:
    """The async mode's sides (``bench/async_mode.py``); none where ``pool`` is None."""
    if not pool:
        return []
    return [
        async_mode.topology(pool, f"framework async mode, 2 x -P custom -c {n}", n)
        for n in ASYNC_MODE_CONCURRENCY
    ]


class Side(Protocol):
    @property
    def label(self) -> str: ...
    @property
    def processes(self) -> int: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def group(self) -> str:
        """``framework``, ``raw``, or the peer's name."""
        ...

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def enqueue(self, count: int) -> None: ...
    def backlog(self) -> int: ...
    def cpu_seconds(self) -> float: ...


@dataclass
class CelerySide:
    label: str
    topology: Topology
    services: BenchServices
    env: dict[str, str]
    task_name: str
    seconds: float
    group: str
    app: str | None = None
    workers: WorkerSet | None = None

    @property
    def processes(self) -> int:
        return self.topology.count

    @property
    def concurrency(self) -> int:
        return self.topology.concurrency

    def start(self) -> None:
        self.workers = WorkerSet(
            self.topology, self.services.broker_url, self.env, app=self.app, queues=("default",)
        ).start()
        self._backlog = redis_backlog(self.services.broker())

    def stop(self) -> None:
        if self.workers is not None:
            self.workers.stop()
        self.workers = None

    def pause(self) -> None:
        assert self.workers is not None
        self.workers.signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.workers is not None
        self.workers.signal(signal.SIGCONT)

    def enqueue(self, count: int) -> None:
        fill(
            self.services.broker_url,
            self.task_name,
            ({"seconds": self.seconds} for _ in range(count)),
        )

    def backlog(self) -> int:
        return self._backlog()

    def cpu_seconds(self) -> float:
        assert self.workers is not None
        return self.workers.cpu_seconds()


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of ``pid`` and all its descendants still running."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
    return total


def process_count(pid: int) -> int:
    count, pending = 0, [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
            count += 1
    return count


# One event loop for every peer's client calls: their connection pools stay valid.
_client_loop = asyncio.new_event_loop()


@dataclass
class PeerSide:
    """An async-native queue's worker command (``bench/peers/<name>_app.py``)."""

    label: str
    name: str
    services: BenchServices
    env: dict[str, str]
    job: Job
    concurrency: int
    processes: int = PEER_PROCESSES
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    module: Any = None

    @property
    def group(self) -> str:
        return self.name

    def command(self) -> list[str]:
        if self.name == "taskiq":
            return [sys.executable, "-m", "taskiq", "worker", "bench.peers.taskiq_app:broker",
                    "--workers", str(self.processes),
                    "--max-async-tasks", str(self.concurrency)]  # fmt: skip
        if self.name == "saq":
            return [sys.executable, "-m", "saq", "bench.peers.saq_app.settings",
                    "--workers", str(self.processes)]  # fmt: skip
        if self.name == "dramatiq":
            return [sys.executable, "-m", "dramatiq", "bench.peers.dramatiq_app",
                    "--processes", str(self.processes),
                    "--threads", str(self.concurrency)]  # fmt: skip
        raise ValueError(f"unknown peer {self.name}")

    def start(self) -> None:
        # The client side (enqueue) reads the same settings as the workers.
        os.environ.update(self.env)
        self.module = importlib.import_module(f"bench.peers.{self.name}_app")
        log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            prefix=f"peer-{self.name}-", suffix=".log", delete=False
        )
        self.log_path = Path(log.name)
        env = {**os.environ, **self.env, "BENCH_PEER_CONCURRENCY": str(self.concurrency)}
        self.process = subprocess.Popen(
            self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        log.close()
        # Every worker process up (and a supervisor, for some), then a moment
        # for their imports and start-up hooks; the warm-up does the rest.
        expected = self.processes + PEER_SUPERVISORS[self.name]
        deadline = time.monotonic() + 60
        while process_count(self.process.pid) < expected:
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: workers not up after 60s")
            time.sleep(0.1)
        time.sleep(2)
        self._check_alive()

    def _check_alive(self) -> None:
        assert self.process is not None
        assert self.log_path is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.label} exited with {self.process.returncode}:\n"
                + self.log_path.read_text(errors="replace")[-3000:]
            )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGCONT)
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.wait(10)
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def pause(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)

    def enqueue(self, count: int) -> None:
        _client_loop.run_until_complete(self.module.enqueue(self.job.key, self.job.seconds, count))

    def backlog(self) -> int:
        return int(self.module.backlog(self.services.redis_db(PEER_BROKER_DB)))

    def cpu_seconds(self) -> float:
        assert self.process is not None
        return process_tree_cpu_seconds(self.process.pid)


def gated_drain(side: Side, count: int, timeout: float) -> tuple[float, float]:
    """(tasks/s, worker CPU µs per task) for ``count`` tasks queued while ``side`` was paused.

    Fails after ``timeout`` seconds, or after ``STALL_SECONDS`` without progress
    (a side that lost tasks must not hold up the run for the whole timeout).
    """
    side.pause()
    try:
        side.enqueue(count)
        # One message may already sit in a paused worker's socket (a blocking
        # read answered while it was stopped): not counted by the backlog.
        held = side.backlog()
        if held < count - side.processes * side.concurrency:
            raise RuntimeError(f"{side.label}: {held} of {count} tasks queued")
    finally:
        used = side.cpu_seconds()
        started = time.perf_counter()
        side.resume()
    deadline = time.monotonic() + timeout
    last, progress_at = count, time.monotonic()
    while (left := side.backlog()) > 0:
        now = time.monotonic()
        if left != last:
            last, progress_at = left, now
        if now > deadline or now - progress_at > STALL_SECONDS:
            raise RuntimeError(
                f"{side.label}: {left} of {count} tasks left after {now - deadline + timeout:.0f}s"
                f" ({now - progress_at:.0f}s without progress)"
            )
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    return count / elapsed, (side.cpu_seconds() - used) / count * 1e6


# -- the suite ------------------------------------------------------------------


@dataclass
class SideFigures:
    side: Side
    ceiling: float
    count: int
    rate: Figure
    fraction: Figure
    cpu: Figure
    failed: str | None = None


def ensure_peers(peers: list[str], report: Report) -> list[str]:
    """The peers whose libraries import, installing the ``bench`` extra if some are missing."""
    for name in [name for name in peers if name not in PEER_PACKAGES]:
        report.notes.append(f"unknown peer {name} skipped (known: {', '.join(PEER_PACKAGES)})")
        peers = [peer for peer in peers if peer != name]

    def missing() -> list[str]:
        return [
            name
            for name in peers
            for module in PEER_PACKAGES[name]
            if importlib.util.find_spec(module) is None
        ]

    if missing():
        print(f"installing the bench extra for {', '.join(missing())} ...", flush=True)
        root = Path(__file__).resolve().parents[1]
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "-e", f"{root}[bench]"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        importlib.invalidate_caches()
        if done.returncode != 0:
            report.notes.append(f"pip install .[bench] failed: {done.stderr.strip()[-300:]}")
    absent = set(missing())
    for name in absent:
        report.notes.append(f"peer {name} skipped: not installed")
    return [name for name in peers if name not in absent]


def io_job(
    report: Report,
    services: BenchServices,
    job: Job,
    rounds: int,
    count: int,
    *,
    pool_size: int,
    max_seconds: float,
    peers: list[str],
    async_pool: str | None,
    only: list[str] | None = None,
) -> None:
    """Drain ``count`` tasks of ``job`` on every side, ``rounds`` times, sides in rotating order."""
    from app.core.background import celery_app

    suite = f"I/O: {job.describe()}, up to {count:,} tasks, 2 processes, Redis"
    # Checked (and a note made where it is missing) only if --sides keeps its sides.
    if any(_picked(t.label, only) for t in async_mode_sides(async_pool)):
        async_pool = async_mode.chosen_pool(async_pool, report, suite)
    else:
        async_pool = None
    framework_env = {**services.worker_env(), "DATABASE_POOL_SIZE": str(pool_size)}
    raw_env = raw_celery_env(services, celery_app, pool_size)
    peer_env = {
        "BENCH_PEER_REDIS": services.redis_url(PEER_BROKER_DB),
        "BENCH_PEER_RESULTS": services.redis_url(PEER_RESULT_DB),
        **({"BENCH_DATABASE_URL": services.database_url} if job.uses_db else {}),
        "BENCH_POOL_SIZE": str(pool_size),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    sides: list[Side] = [
        CelerySide(t.label, t, services, framework_env, job.framework_task, job.seconds,
                   "framework")
        for t in FRAMEWORK_SIDES + async_mode_sides(async_pool)
    ]  # fmt: skip
    sides += [
        CelerySide(t.label, t, services, raw_env, job.raw_task, job.seconds, "raw", app=RAW_APP)
        for t in RAW_SIDES
    ]
    sides += [
        PeerSide(f"{name}, {PEER_PROCESSES} processes x {n}", name, services, peer_env, job, n)
        for name in ensure_peers(peers, report)
        for n in PEER_CONCURRENCY
    ]
    sides = [side for side in sides if _picked(side.label, only)]
    figures = []
    for side in sides:
        slots = side.concurrency
        if job.uses_db:
            slots = min(slots, pool_size + POOL_OVERFLOW)
        ceiling = side.processes * slots / job.seconds
        side_count = min(count, max(200, int(ceiling * max_seconds)))
        label = f"{side.label} [ceiling {ceiling:,.0f}/s, {side_count:,} tasks]"
        figures.append(
            SideFigures(
                side, ceiling, side_count,
                report.figure(suite, label, "tasks/s"),
                report.figure(suite, f"{side.label}: fraction of ceiling", "%"),
                report.figure(suite, f"{side.label}: worker CPU per task", "µs"),
            )
        )  # fmt: skip
    for round_number in range(rounds):
        turn = round_number % len(figures)
        for entry in figures[turn:] + figures[:turn]:
            if entry.failed:
                continue
            print(f"   {job.key}: {entry.side.label} ...", flush=True)
            try:
                entry.side.start()
                try:
                    # Warm-up, not measured: imports, connections, the engine's pool.
                    warm = max(20, 2 * entry.side.processes * entry.side.concurrency)
                    gated_drain(entry.side, warm, timeout=300)
                    rate, cpu = gated_drain(entry.side, entry.count, timeout=900)
                finally:
                    entry.side.stop()
            except Exception as exc:  # noqa: BLE001 - one failing side must not lose the others
                entry.failed = f"{type(exc).__name__}: {exc}"[:500]
                report.notes.append(f"{suite}: {entry.side.label} failed: {entry.failed}")
                continue
            finally:
                services.results().flushdb()
            entry.rate.values.append(rate)
            entry.fraction.values.append(100 * rate / entry.ceiling)
            entry.cpu.values.append(cpu)
    _ratios(report, suite, figures)


def _picked(label: str, only: list[str] | None) -> bool:
    """Whether ``--sides`` keeps the side ``label`` (all are kept without it)."""
    return not only or any(part in label for part in only)


def _ratios(report: Report, suite: str, figures: list[SideFigures]) -> None:
    """Each framework side against prefork, raw Celery and the best peer at its concurrency."""
    existing = {t.label for t in FRAMEWORK_SIDES}
    prefork = next((f for f in figures if f.side.label == FRAMEWORK_SIDES[0].label), None)
    for concurrency in sorted({f.side.concurrency for f in figures if f.side.concurrency > 1}):
        at = [f for f in figures if f.side.concurrency == concurrency and f.rate.values]
        peers = [f for f in at if f.side.group not in ("framework", "raw")]
        best_peer = None
        if peers:
            # Round by round, the best peer of that round.
            best_peer = Figure(suite, f"best peer at c={concurrency}", "tasks/s")
            best_peer.values = [max(v) for v in zip(*(p.rate.values for p in peers), strict=False)]
        raw = next((f for f in at if f.side.group == "raw"), None)
        for entry in (f for f in at if f.side.group == "framework"):
            # The targets of issue 14 are the new mode's; the existing sides are context.
            new_mode = entry.side.label not in existing
            if new_mode:
                ceiling = Figure(
                    suite, "ceiling", "tasks/s", [entry.ceiling] * len(entry.rate.values)
                )
                report.ratio(
                    suite, f"{entry.side.label} / its ceiling", entry.rate, ceiling, ">= 0.8"
                )
            if prefork is not None and prefork.rate.values:
                target = ">= 10" if new_mode and concurrency == 100 else ""
                report.ratio(
                    suite, f"{entry.side.label} / prefork", entry.rate, prefork.rate, target
                )
            if raw is not None:
                report.ratio(suite, f"{entry.side.label} / {raw.side.label}", entry.rate, raw.rate)
            if best_peer is not None:
                target = ">= 0.8" if new_mode else ""
                report.ratio(
                    suite, f"{entry.side.label} / best peer", entry.rate, best_peer, target
                )
        if raw is not None and best_peer is not None:
            report.ratio(suite, f"{raw.side.label} / best peer", raw.rate, best_peer)


def raw_celery_env(services: BenchServices, framework_app: Any, pool_size: int) -> dict[str, str]:
    """The environment of raw Celery's workers: the framework's values, read from its app."""
    expires = framework_app.conf.result_expires
    return {
        "BENCH_SETTINGS": "framework",
        "BENCH_BROKER": services.broker_url,
        "BENCH_BACKEND": services.result_url,
        "BENCH_DATABASE_URL": services.database_url,
        "BENCH_POOL_SIZE": str(pool_size),
        "BENCH_RESULT_EXPIRES": str(int(getattr(expires, "total_seconds", lambda: expires)())),
        "BENCH_VISIBILITY_TIMEOUT": str(
            framework_app.conf.broker_transport_options["visibility_timeout"]
        ),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
