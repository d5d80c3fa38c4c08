"""A dispatch the broker does not take never looks like a success, and never hangs.

Each case runs ``tests/support/dispatch_probe.py`` in a process of its own,
configured for the broker under test: one that accepts connections and never
answers (a listening socket nobody reads), one that refuses them (a bound
socket that does not listen: the port stays ours), and a live private Redis.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.dispatch_probe import SECRET
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 1.5  # BACKGROUND_DISPATCH_TIMEOUT of the probes
# A bound, not a timing: without a deadline these calls hang (a silent broker)
# or take 19 s (a result backend that is down).
BOUND = 10 * TIMEOUT
PASSWORD = "broker-pass-91c2"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose server completes the TCP handshake and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port that refuses connections (bound, not listening: nobody else can take it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def backend() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def probe(scenario: str, **env: str) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Run the probe; its JSON answer, its JSON log lines, and all it wrote to stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.dispatch_probe", scenario],
        cwd=ROOT,
        env={
            **os.environ,
            "LOG_FORMAT": "json",
            "BACKGROUND_DISPATCH_TIMEOUT": str(TIMEOUT),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    return json.loads(done.stdout.splitlines()[-1]), lines, done.stdout + done.stderr


def relay_once(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.core.background", "relay", "--once"],
        cwd=ROOT,
        env={**os.environ, "LOG_FORMAT": "json", "BACKGROUND_DISPATCH_TIMEOUT": str(TIMEOUT),
             **env},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def queued_ids(server: RedisServer, queue: str = "default") -> list[str]:
    """The task ids of the messages waiting in ``queue`` of a Redis broker."""
    return [json.loads(raw)["headers"]["id"] for raw in server.client().lrange(queue, 0, -1)]


def sent_record(server: RedisServer, task_id: str, db: int = 0) -> dict[str, Any] | None:
    raw = server.client(db).get(f"celery-task-meta-{task_id}")
    return None if raw is None else dict(json.loads(raw))


def log_line(lines: list[dict[str, Any]], message: str) -> dict[str, Any]:
    found = [line for line in lines if line.get("event", "").startswith(message)]
    assert len(found) == 1, lines
    return found[0]


# -- delay() ----------------------------------------------------------------


@pytest.mark.parametrize(
    "broker",
    ["redis://:{password}@127.0.0.1:{port}/0", "amqp://guest:{password}@127.0.0.1:{port}//"],
)
def test_delay_to_a_broker_that_never_answers_fails_in_bounded_time(
    broker: str, silent_port: int, backend: RedisServer
) -> None:
    out, _lines, output = probe(
        "delay",
        CELERY_BROKER_URL=broker.format(password=PASSWORD, port=silent_port),
        CELERY_RESULT_BACKEND=backend.url(),
    )
    assert out["raised"] == "TaskDispatchError", out
    assert out["seconds"] < BOUND
    # Names the task, its id and the broker, with the password masked.
    (task_id,) = out["task_ids"]
    assert f"probe.notify [{task_id}] was not sent" in out["message"]
    assert broker.format(password="***", port=silent_port) in out["message"]
    assert PASSWORD not in output
    assert SECRET not in output
    # No SENT record is left to say "pending" for a day.
    assert sent_record(backend, task_id) is None
    assert out["metrics"] == {"raised": 1, "deferred": 0, "lost": 0}


def test_delay_with_broker_and_result_backend_down_fails_in_bounded_time(
    refused_port: int,
) -> None:
    url = f"redis://127.0.0.1:{refused_port}/0"
    out, _lines, _output = probe("delay", CELERY_BROKER_URL=url, CELERY_RESULT_BACKEND=url)
    # Celery alone: RuntimeError("Retry limit exceeded ...") after 19 s.
    assert out["raised"] == "TaskDispatchError", out
    assert out["seconds"] < BOUND
    assert "check that the broker" in out["message"]


@pytest.mark.parametrize("broker_up", [False, True], ids=["broker down", "control"])
def test_a_failed_send_with_a_task_id_gives_its_lease_back(
    broker_up: bool, refused_port: int, backend: RedisServer
) -> None:
    """Else the id stays taken for the lease's lifetime and every resend is "deduplicated"."""
    broker = backend.url() if broker_up else f"redis://127.0.0.1:{refused_port}/0"
    out, _lines, _output = probe(
        "delay_with_id",
        CELERY_BROKER_URL=broker,
        CELERY_RESULT_BACKEND=backend.url(1),
        BACKGROUND_DEDUP_BACKEND="redis",
        BACKGROUND_DEDUP_REDIS_URL=backend.url(2),
    )
    if broker_up:
        assert out["returned"] == out["task_id"]
        assert out["lease_holder"] is not None  # the sent task holds its id
    else:
        assert out["raised"] == "TaskDispatchError"
        assert out["lease_holder"] is None


def test_delay_to_a_live_broker_is_sent_and_recorded(backend: RedisServer) -> None:
    """The control of the two above: the same probe, the same checks, a broker that works."""
    out, _lines, _output = probe(
        "delay", CELERY_BROKER_URL=backend.url(), CELERY_RESULT_BACKEND=backend.url(1)
    )
    task_id = out["returned"]
    assert queued_ids(backend) == [task_id]
    assert (sent_record(backend, task_id, db=1) or {}).get("status") == "SENT"
    assert out["metrics"] == {"raised": 0, "deferred": 0, "lost": 0}


# -- delay_many ----------------------------------------------------------------

CALLS, BATCH, PAYLOAD = 60, 10, 15_000  # six batches of ten messages of about 20 kB


@pytest.mark.parametrize(
    "room",
    # Bytes of memory the broker has left: the client's own buffers take about
    # 200 kB of it, so the broker refuses at once (before any message), within
    # its first batch (the pipeline fails, cut halfway), or after a few batches.
    [1_000_000, 330_000, 0, None],
    ids=["full after some batches", "full in the first batch", "full at once", "control"],
)
def test_delay_many_partly_sent_reports_what_was_sent_and_names_the_rest(
    room: int | None, backend: RedisServer
) -> None:
    """The broker stops taking messages (a real Redis of this test's own, out of memory).

    The batches sent before the failure are reported (``exc.sent``, the
    dispatched metric, SENT records); the failing batch's ids are named by
    ``TaskDispatchError`` and have no SENT record; nothing is reported sent
    that the broker does not hold. The control: the same call, room enough.
    """
    with RedisServer() as broker:
        client = broker.client()
        if room is not None:
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", used + room)
        out, _lines, output = probe(
            "delay_many",
            CELERY_BROKER_URL=broker.url(),
            CELERY_RESULT_BACKEND=backend.url(),
            PROBE_CALLS=str(CALLS),
            PROBE_BATCH=str(BATCH),
            PROBE_PAYLOAD=str(PAYLOAD),
        )
        client.config_set("maxmemory", 0)
        # Oldest first (kombu pushes on the left and takes from the right).
        queued = queued_ids(broker)[::-1]
    assert SECRET not in output
    if room is None:
        assert out["returned"] == queued
        assert out["dispatched"] == CALLS
        assert all((sent_record(backend, i) or {}).get("status") == "SENT" for i in queued)
        return
    assert out["raised"] == "TaskDispatchError", out
    sent, unsent = out["sent"], out["task_ids"]
    # Whole batches went out before the failure, and not all of them.
    assert len(sent) < CALLS
    assert len(sent) % BATCH == 0
    assert (len(sent) > 0) is (room > 500_000), len(sent)
    if 0 < room < 500_000:
        # The failure is the first batch's pipeline (kombu: "delivery is uncertain").
        assert "BatchPublishError" in out["message"], out["message"]
    assert len(unsent) == BATCH
    assert not set(sent) & set(unsent)
    # Nothing reported sent that the broker does not hold, in the callers' order...
    assert queued[: len(sent)] == sent
    # ...and whatever else it holds was named as not confirmed (a batch cut halfway).
    assert set(queued[len(sent) :]) <= set(unsent)
    assert out["dispatched"] == len(sent)
    assert out["metrics"]["raised"] == len(unsent)
    assert all((sent_record(backend, i) or {}).get("status") == "SENT" for i in sent)
    assert all(sent_record(backend, i) is None for i in unsent)


# -- delay_on_commit -----------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own (the relay drains every pending outbox row in it)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/app.db"
        return
    services = request.getfixturevalue("postgres_service")
    with services.private_database() as url:
        yield url


@pytest.mark.parametrize("session", ["on_commit", "on_commit_plain"])
def test_delay_on_commit_with_the_broker_down_goes_to_the_outbox(
    session: str, refused_port: int, backend: RedisServer, database_url: str
) -> None:
    """The default: the change is committed and its task waits in the outbox."""
    env = {"DATABASE_URL": database_url, "CELERY_RESULT_BACKEND": backend.url()}
    out, lines, output = probe(
        session, CELERY_BROKER_URL=f"redis://127.0.0.1:{refused_port}/0", **env
    )
    assert "raised" not in out, out
    assert out["orders"] == 1
    task_id = out["task_id"]
    assert out["outbox"] == [task_id]
    line = log_line(lines, "Dispatch after commit failed")
    assert line["level"] == "warning"
    assert line["task_id"] == task_id
    assert line["task_name"] == "probe.notify"
    assert line["outcome"] == "deferred"
    assert line["argument_keys"] == ["order_id", "secret"]
    assert SECRET not in output
    assert out["metrics"] == {"raised": 1, "deferred": 1, "lost": 0}
    # The broker is back: the relay sends it, with the id the caller was given.
    relayed = relay_once(CELERY_BROKER_URL=backend.url(), **env)
    assert relayed.returncode == 0, relayed.stderr[-3000:]
    assert queued_ids(backend) == [task_id]


def test_delay_on_commit_with_fallback_error_reports_the_task_lost(
    refused_port: int, backend: RedisServer, tmp_path: Path
) -> None:
    out, lines, output = probe(
        "on_commit",
        CELERY_BROKER_URL=f"redis://127.0.0.1:{refused_port}/0",
        CELERY_RESULT_BACKEND=backend.url(),
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/app.db",
        BACKGROUND_AFTER_COMMIT_FALLBACK="error",
    )
    # The change is committed; the commit does not pretend its task went out.
    assert out["orders"] == 1
    assert out["raised"] == "TaskDispatchError"
    assert out["task_id"] in out["message"]
    assert out["outbox"] == []
    line = log_line(lines, "Task lost")
    assert line["level"] == "error"
    assert line["task_id"] == out["task_id"]
    assert line["task_name"] == "probe.notify"
    assert line["argument_keys"] == ["order_id", "secret"]
    assert SECRET not in output
    assert out["metrics"]["lost"] == 1


def test_delay_on_commit_without_an_outbox_table_reports_the_task_lost(
    refused_port: int, backend: RedisServer, tmp_path: Path
) -> None:
    out, lines, _output = probe(
        "on_commit",
        CELERY_BROKER_URL=f"redis://127.0.0.1:{refused_port}/0",
        CELERY_RESULT_BACKEND=backend.url(),
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/app.db",
        PROBE_DROP_OUTBOX="1",
    )
    assert out["orders"] == 1
    assert out["raised"] == "TaskDispatchError"
    assert "writing them to the outbox failed too" in out["message"]
    line = log_line(lines, "Task lost")
    assert "background_outbox" in line["outbox_error"]
    assert out["metrics"] == {"raised": 1, "deferred": 0, "lost": 1}


# -- the relay ----------------------------------------------------------------


def test_relay_once_fails_when_the_broker_does_not_take_a_row(
    refused_port: int, backend: RedisServer, tmp_path: Path
) -> None:
    down = f"redis://:{PASSWORD}@127.0.0.1:{refused_port}/0"
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/app.db",
        "CELERY_RESULT_BACKEND": backend.url(),
    }
    out, _lines, _output = probe("on_commit", CELERY_BROKER_URL=down, **env)
    assert out["outbox"] == [out["task_id"]]

    relayed = relay_once(CELERY_BROKER_URL=down, **env)
    assert relayed.returncode == 1
    # Why, on the CLI's own line: the broker's error for that row.
    (said,) = [line for line in relayed.stderr.splitlines() if line.startswith("relay: ")]
    assert said.startswith("relay: not every pending task was sent: ")
    assert f"probe.notify [{out['task_id']}] was not sent" in said
    assert PASSWORD not in relayed.stderr
    lines = [json.loads(line) for line in relayed.stderr.splitlines() if line.startswith("{")]
    line = log_line(lines, "Outbox send failed")
    assert line["task_id"] == out["task_id"]
    assert line["task_name"] == "probe.notify"
    # The row stayed pending: the next pass, with the broker back, sends it.
    relayed = relay_once(CELERY_BROKER_URL=backend.url(), **env)
    assert relayed.returncode == 0, relayed.stderr[-3000:]
    assert queued_ids(backend) == [out["task_id"]]
