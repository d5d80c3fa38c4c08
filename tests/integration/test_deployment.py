"""A rehearsal of deploy/ on this machine: every process type from the unit files, under load.

No systemd as PID 1 and no Docker engine here, so the test plays systemd's
part: for each unit it reads the ``EnvironmentFile=`` lines (deploy/env/) and
the ``ExecStart=``/``ExecStartPost=`` lines (deploy/systemd/), replaces only
what is this machine's (the servers' URLs, ports, the state folder: see
``overrides``) and starts the command as an OS process of its own, in a clean
environment as systemd gives one. Then, as a host would:

1. the migrate unit's command (``alembic upgrade head``) on an empty database;
2. workers, beat, relay and API in the documented start order, each started
   the way its unit's ``ExecStartPost=`` health check accepts;
3. a load of HTTP requests to the API, half of them sent through the outbox
   (so the relay matters), while each process type in turn is stopped with
   SIGTERM (the main process only, as ``KillMode=mixed``) and started again,
   and one worker is SIGKILLed with its pool (a crash);
4. every entity the API created has been processed (the example task
   increments ``entities.processed_count`` in PostgreSQL: 0 is a lost task,
   2 a task run twice), the outbox is empty, and each health command failed
   while its process was down and passed once it was back;
5. everything stopped in the documented order, each process exiting 0.

Test-only change to a command: the workers also import
``tests.reliability.short_visibility`` (Redis gives a killed worker's messages
back after 10 s instead of the production hour, which the framework requires
to exceed its 1,860 s time limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
import redis

from tests.conftest import PrivateBroker
from tests.support.deploy_files import HOST_APP_DIR, ROOT, ProcessSpec, process_spec
from tests.support.redis_server import free_port
from tests.support.services import Services

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

WORKERS = ("background-worker@high_priority.service", "background-worker@default.service")
DEFAULT_WORKER = WORKERS[1]
# At least this many entities, whatever the pace (a few hundred tasks).
MIN_REQUESTS = 300
# The restarts take ~30 s on 2 cores: ~10 requests a second spread the load over them.
REQUEST_INTERVAL = 0.08
SHORT_VISIBILITY = "tests.reliability.short_visibility"
# Readiness may follow liveness by a moment: a worker beats once it consumes, and
# answers pings once its event loop has subscribed to the broadcasts.
READY = ("--ready", "--wait", "15")
# systemd starts a service with an environment of its own (plus its env files).
CLEAN_ENV_KEYS = ("PATH", "HOME", "LANG", "TMPDIR")


@dataclass
class Service:
    """One unit's process, started and stopped as systemd would."""

    spec: ProcessSpec
    logs: Path
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def name(self) -> str:
        return self.spec.unit

    @property
    def env(self) -> dict[str, str]:
        base = {key: os.environ[key] for key in CLEAN_ENV_KEYS if key in os.environ}
        return {**base, **self.spec.env}

    def start(self) -> None:
        assert self.spec.working_directory == HOST_APP_DIR
        self.starts += 1
        log = (self.logs / f"{self.name}.{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [*self.spec.local(self.spec.exec_start, sys.executable), *self.extra_args],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the unit's cgroup
        )
        log.close()
        # Started means its ExecStartPost= check passed (systemd fails the start otherwise).
        for post in self.spec.exec_start_post:
            code, line = self.run(post)
            assert code == 0, f"{self.name}: ExecStartPost failed: {line}\n{self.log_tail()}"

    def run(self, argv: list[str], *extra: str) -> tuple[int, str]:
        result = subprocess.run(
            [*self.spec.local(argv, sys.executable), *extra],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=90,
        )
        return result.returncode, (result.stdout + result.stderr).strip()

    def health(self, *extra: str) -> tuple[int, str]:
        """The unit's health command (its ExecStartPost= without --wait), plus ``extra``."""
        (post,) = self.spec.exec_start_post
        wait = post.index("--wait")
        return self.run([*post[:wait], *post[wait + 2 :]], *extra)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM to the main process only (KillMode=mixed), then its exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not stop within {timeout}s") from None
        # What systemd does after the main process exits: nothing may be left.
        self._kill_group()
        return code

    def signal_children(self, signum: int) -> None:
        """Signal the main process's children (a prefork worker's pool processes)."""
        assert self.process is not None
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert children, f"{self.name} has no child process"
        for child in children:
            os.kill(int(child), signum)

    def kill(self) -> None:
        """SIGKILL to every process of the unit at once (a crash)."""
        assert self.process is not None
        self._kill_group()
        self.process.wait(10)

    def _kill_group(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def log_tail(self) -> str:
        path = self.logs / f"{self.name}.{self.starts}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@dataclass
class Load:
    """HTTP requests to the API in a thread: POST /entities, every other one via the outbox."""

    api_url: str
    created: int = 0
    retried: int = 0
    failures: list[str] = field(default_factory=list)
    # name -> (delivery, task id, seconds into the load it was answered): to explain a loss.
    answers: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    _began: float = field(default_factory=time.monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(120)
        assert not self._thread.is_alive(), "the load did not finish"

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set() or n < MIN_REQUESTS:
            delivery = "outbox" if n % 2 else "after_commit"
            self._create(f"deploy-{n}", delivery)
            n += 1
            time.sleep(REQUEST_INTERVAL)

    def _create(self, name: str, delivery: str) -> None:
        # A client behind a load balancer: a refused or failed request is sent again
        # (the API is being restarted); an answer lost after the commit would make a
        # second entity, which the final count reads from the database anyway.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            request = urllib.request.Request(
                f"{self.api_url}/entities?delivery={delivery}",
                data=json.dumps({"name": name}).encode(),
                headers={"content-type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    if response.status == 201:
                        self.created += 1
                        task_id = json.loads(response.read())["task_id"]
                        self.answers[name] = (delivery, task_id, time.monotonic() - self._began)
                        return
            except (OSError, urllib.error.HTTPError):
                pass
            self.retried += 1
            time.sleep(0.2)
        self.failures.append(name)


@dataclass(frozen=True)
class Tally:
    entities: int
    lost: int
    twice: int
    unsent_outbox: int
    outbox_rows: int


async def tally(dsn: str) -> Tally:
    connection = await asyncpg.connect(dsn)
    try:
        row = await connection.fetchrow(
            "SELECT count(*) AS entities,"
            " count(*) FILTER (WHERE processed_count = 0) AS lost,"
            " count(*) FILTER (WHERE processed_count > 1) AS twice"
            " FROM entities"
        )
        outbox = await connection.fetchrow(
            "SELECT count(*) AS rows, count(*) FILTER (WHERE sent_at IS NULL) AS unsent"
            " FROM background_outbox"
        )
    finally:
        await connection.close()
    assert row is not None
    assert outbox is not None
    return Tally(row["entities"], row["lost"], row["twice"], outbox["unsent"], outbox["rows"])


async def explain_lost(dsn: str, load: Load, logs: list[tuple[str, str]], broker_url: str) -> str:
    """What became of each entity never processed: its request, outbox row, dead letter,
    result, where its message is in Redis, and every log line naming its task."""
    connection = await asyncpg.connect(dsn)
    broker = redis.Redis.from_url(broker_url)
    try:
        lost = await connection.fetch(
            "SELECT id, name, created_at FROM entities WHERE processed_count = 0"
        )
        lines: list[str] = []
        for entity in lost[:5]:
            delivery, task_id, answered = load.answers.get(entity["name"], ("?", "?", -1.0))
            outbox = await connection.fetch(
                "SELECT id, sent_at, attempts, last_error FROM background_outbox"
                " WHERE payload LIKE $1",
                f"%{entity['id']}%",
            )
            dead = await connection.fetch(
                "SELECT reason, error_type, error_message, attempts FROM background_dead_letters"
                " WHERE task_id = $1",
                task_id,
            )
            meta = broker.get(f"celery-task-meta-{task_id}")
            queued = [
                queue
                for queue in ("default", "high_priority", "low_priority")
                for message in broker.lrange(queue, 0, -1)
                if task_id.encode() in message
            ]
            unacked = [
                tag for tag, body in broker.hgetall("unacked").items() if task_id.encode() in body
            ]
            mentions = [
                f"  {name}: {line.strip()[:400]}"
                for name, text in logs
                for line in text.splitlines()
                if task_id in line or str(entity["id"]) in line
            ]
            lines += [
                f"entity {entity['id']} {entity['name']} created {entity['created_at']}:"
                f" {delivery} task {task_id}, answered at {answered:.1f}s of the load",
                f"  outbox: {[dict(row) for row in outbox]}",
                f"  dead letter: {[dict(row) for row in dead]}",
                f"  result: {meta!r}; queued in {queued}; unacked: {len(unacked)}",
                *mentions[:20],
            ]
        return "\n".join(lines)
    finally:
        broker.close()
        await connection.close()


def wait_until_done(dsn: str, timeout: float) -> Tally:
    deadline = time.monotonic() + timeout
    while True:
        result = asyncio.run(tally(dsn))
        if (result.lost == 0 and result.unsent_outbox == 0) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def deployment_broker_url(service: Service) -> str:
    return service.spec.env["CELERY_BROKER_URL"]


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def database(stack: Services) -> Iterator[str]:
    """An empty PostgreSQL database: the migrate unit makes its tables."""
    with stack.private_database() as url:
        yield url


@pytest.fixture
def deployment(
    database: str, private_broker: PrivateBroker, tmp_path: Path
) -> Iterator[dict[str, Service]]:
    state = tmp_path / "state"  # systemd's StateDirectory=app-background
    metrics = tmp_path / "api-metrics"  # RuntimeDirectory=app-background-api
    state.mkdir()
    metrics.mkdir()
    # What is this machine's and not the files': servers, ports and folders.
    overrides = {
        "DATABASE_URL": database,
        "CELERY_BROKER_URL": private_broker.url,
        "CELERY_RESULT_BACKEND": private_broker.url,
        "BACKGROUND_HEARTBEAT_DIR": str(state),
        "BEAT_SCHEDULE_FILE": str(state / "celerybeat-schedule"),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        "API_HOST": "127.0.0.1",
        "API_PORT": str(free_port()),
    }
    units = [
        "background-migrate.service",
        *WORKERS,
        "background-beat.service",
        "background-relay.service",
        "background-api.service",
    ]
    logs = tmp_path / "logs"
    logs.mkdir()
    started: dict[str, Service] = {}
    for unit in units:
        own = {"BACKGROUND_METRICS_PORT": str(free_port())} if unit in WORKERS else {}
        extra = ("--include", SHORT_VISIBILITY) if unit in WORKERS else ()
        started[unit] = Service(process_spec(unit, {**overrides, **own}), logs, extra)
    try:
        yield started
    finally:
        for service in started.values():
            if service.process is not None and service.process.poll() is None:
                service.kill()


def assert_health(service: Service, *extra: str, ok: bool) -> str:
    code, line = service.health(*extra)
    assert (code == 0) is ok, f"{service.name} health {extra}: {code} {line}"
    assert len(line.splitlines()) == 1, line
    assert line.startswith("ok: " if ok else "fail: "), line
    return line


def restart(service: Service, *failing_check: str) -> None:
    """SIGTERM, a clean exit, its health check failing while down, then started again."""
    assert service.terminate() == 0, f"{service.name} exit code\n{service.log_tail()}"
    assert_health(service, *failing_check, ok=False)
    service.start()
    assert_health(service, *READY, ok=True)


@pytest.mark.timeout(300)
def test_deploy_files_run_every_process_type_and_lose_no_task_across_restarts(
    deployment: dict[str, Service], database: str
) -> None:
    migrate = deployment["background-migrate.service"]
    api = deployment["background-api.service"]
    relay = deployment["background-relay.service"]
    beat = deployment["background-beat.service"]
    high, default = (deployment[name] for name in WORKERS)
    dsn = database.replace("postgresql+asyncpg://", "postgresql://")
    began = time.monotonic()

    # 1. Migrations first, as the one-shot unit runs them.
    code, output = migrate.run(migrate.spec.exec_start)
    assert code == 0, output

    # 2. Workers, beat, then relay and API (background.target's order).
    started_order = (high, default, beat, relay, api)
    for service in started_order:
        service.start()
    # Started means live (each ExecStartPost= passed); ready too, the same moment or soon after.
    with ThreadPoolExecutor(5) as checks:
        list(checks.map(lambda service: assert_health(service, *READY, ok=True), started_order))
    api_url = f"http://127.0.0.1:{api.spec.env['API_PORT']}"
    assert status(f"{api_url}/ready") == 200
    assert status(f"{api_url}/health") == 200  # a worker answered through the broker too
    started = time.monotonic() - began

    # 3. The load, while each process type is stopped and started again in turn.
    load = Load(api_url)
    load.start()
    time.sleep(2)
    steps: list[str] = []
    for service, failing_check in (
        (api, ()),
        (relay, ()),
        (beat, ()),
        (default, ("--timeout", "2")),
    ):
        step = time.monotonic()
        restart(service, *failing_check)
        steps.append(f"{service.name} {time.monotonic() - step:.1f}s")
    # A crash with work in hand: its pool processes frozen (SIGSTOP), the worker takes
    # messages it cannot finish (recorded as unacknowledged in Redis), then the worker
    # and its pool are SIGKILLed together.
    step = time.monotonic()
    default.signal_children(signal.SIGSTOP)
    broker = redis.Redis.from_url(deployment_broker_url(default))
    try:
        # Up to 4 (one per pool process, prefetch 1): three show the crash holds work.
        assert wait_for(lambda: broker.hlen("unacked") >= 3, 15), "the worker held no messages"
        held = int(broker.hlen("unacked"))
    finally:
        broker.close()
    default.kill()
    # It can no longer answer a ping; its heartbeat stays fresh for up to 30 s
    # (liveness fails after that), and the restarted worker clears it at once.
    assert_health(default, "--ready", "--timeout", "2", ok=False)
    default.start()
    assert_health(default, *READY, ok=True)
    steps.append(f"{default.name} killed holding {held} {time.monotonic() - step:.1f}s")
    load.finish()
    restarts = time.monotonic() - began - started

    # 4. Every entity the API committed was processed; the outbox is empty.
    # The killed worker's messages come back after the 10 s visibility timeout.
    result = wait_until_done(dsn, timeout=60)
    print(
        f"\n[deployment] requests answered 201: {load.created} (retried {load.retried} "
        f"while the API restarted); entities: {result.entities}, lost: {result.lost}, "
        f"processed twice: {result.twice}; outbox rows: {result.outbox_rows}, "
        f"unsent: {result.unsent_outbox}; "
        f"start {started:.1f}s, load and restarts {restarts:.1f}s ({', '.join(steps)})"
    )
    assert not load.failures, f"requests never answered: {load.failures[:5]}"
    assert load.created >= MIN_REQUESTS
    assert result.entities >= load.created
    if result.lost:
        logs = [(path.name, path.read_text(errors="replace")) for path in api.logs.glob("*.log")]
        why = asyncio.run(explain_lost(dsn, load, logs, deployment_broker_url(default)))
        raise AssertionError(f"{result.lost} of {result.entities} tasks never ran:\n{why}")
    assert result.unsent_outbox == 0
    # Half the requests went through the outbox (some after_commit ones too, if the
    # broker refused them): the relay sent them, across its own restart.
    assert result.outbox_rows >= load.created // 2

    # 5. The documented stop order; each process exits cleanly, heartbeats go with it.
    state = Path(relay.spec.env["BACKGROUND_HEARTBEAT_DIR"])
    for service in (api, relay, beat, default, high):
        assert service.terminate() == 0, f"{service.name}\n{service.log_tail()}"
    assert not (state / "relay.heartbeat").exists()
    assert not (state / "beat.heartbeat").exists()
    assert list(state.glob("celerybeat-schedule*")), "beat kept no schedule file"
