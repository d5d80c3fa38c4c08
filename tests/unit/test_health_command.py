"""``python -m app.core.background health``: what each verdict means, without services.

The checks that need a broker, a database or a worker run in
tests/integration/test_deployment.py against real processes; here, the
heartbeat files, beat's scheduler that writes one, the API's status codes
(a local HTTP server that answers like /ready) and the one-line answer.
"""

from __future__ import annotations

import http.server
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from app.core.background.__main__ import build_parser
from app.core.background.internals.console.health_cli import HealthContext, run
from app.core.background.internals.operations.beat_heartbeat import (
    BEAT_MAX_INTERVAL,
    HeartbeatScheduler,
)
from app.core.background.internals.operations.heartbeat_file import (
    BEAT_FILE,
    RELAY_FILE,
    FileHeartbeat,
    heartbeat_age,
)

# Nothing listens there: a check that needs the broker or the database fails fast.
REFUSED_REDIS = "redis://127.0.0.1:1/0"


def no_app() -> Celery:
    raise AssertionError("this check needs no Celery app")


def health(folder: Path, *argv: str, app: object = no_app) -> tuple[int, str]:
    args = build_parser().parse_args(["health", *argv])
    context = HealthContext("postgresql+asyncpg://nobody@127.0.0.1:1/none", folder, app)  # type: ignore[arg-type]
    out = io.StringIO()
    code = run(args, context, out)
    line = out.getvalue()
    assert line.count("\n") == 1, line  # one line, for a probe's log
    return code, line.strip()


def test_heartbeat_file_is_touched_aged_and_removed(tmp_path: Path) -> None:
    heartbeat = FileHeartbeat(tmp_path / "sub" / RELAY_FILE)
    assert heartbeat_age(heartbeat.path) is None
    heartbeat.beat()
    age = heartbeat_age(heartbeat.path)
    assert age is not None
    assert age < 5
    os.utime(heartbeat.path, (time.time() - 100, time.time() - 100))
    assert heartbeat_age(heartbeat.path) == pytest.approx(100, abs=5)
    heartbeat.beat()  # an existing file: its time is set to now
    assert heartbeat_age(heartbeat.path) == pytest.approx(0, abs=5)
    heartbeat.remove()
    heartbeat.remove()  # twice: beat's stop closes its scheduler more than once
    assert not heartbeat.path.exists()


@pytest.mark.parametrize(("process", "file_name"), [("relay", RELAY_FILE), ("beat", BEAT_FILE)])
def test_relay_and_beat_are_live_while_their_heartbeat_file_is_fresh(
    tmp_path: Path, process: str, file_name: str
) -> None:
    code, line = health(tmp_path, process)
    assert code == 1
    assert line.startswith(f"fail: {process}: no heartbeat file")
    FileHeartbeat(tmp_path / file_name).beat()
    code, line = health(tmp_path, process)
    assert (code, line.split(":")[0]) == (0, "ok")
    old = time.time() - 61
    os.utime(tmp_path / file_name, (old, old))
    code, line = health(tmp_path, process)
    assert code == 1
    assert "old (limit" in line
    assert health(tmp_path, process, "--max-age", "120")[0] == 0


def test_readiness_needs_the_broker_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Celery prefers this variable to the app's configuration.
    monkeypatch.setenv("CELERY_BROKER_URL", REFUSED_REDIS)
    FileHeartbeat(tmp_path / BEAT_FILE).beat()
    app = Celery("refused", broker=REFUSED_REDIS, set_as_current=False)
    code, line = health(tmp_path, "beat", "--ready", "--timeout", "1", app=lambda: app)
    assert code == 1
    assert line.startswith("fail: broker: ")
    # Not live: readiness says so without asking the broker.
    (tmp_path / BEAT_FILE).unlink()
    assert health(tmp_path, "beat", "--ready")[1].startswith("fail: beat: no heartbeat file")


def test_wait_checks_again_until_it_passes(tmp_path: Path) -> None:
    timer = threading.Timer(1.5, FileHeartbeat(tmp_path / RELAY_FILE).beat)
    timer.start()
    began = time.monotonic()
    code, _line = health(tmp_path, "relay", "--wait", "10")
    timer.join()
    assert code == 0
    assert 1.0 < time.monotonic() - began < 8


def test_worker_needs_its_hostname(tmp_path: Path) -> None:
    assert health(tmp_path, "worker") == (
        1,
        "fail: health worker needs --hostname (the worker's own)",
    )


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/ready" else 404)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def api_url() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_api_is_live_when_it_answers_and_ready_only_on_200(tmp_path: Path, api_url: str) -> None:
    _Ready.status = 503  # its database or broker is down
    try:
        assert health(tmp_path, "api", "--url", api_url)[0] == 0
        code, line = health(tmp_path, "api", "--url", api_url, "--ready")
        assert code == 1
        assert line.endswith("answered 503")
    finally:
        _Ready.status = 200
    assert health(tmp_path, "api", "--url", api_url + "/", "--ready")[0] == 0


def test_api_that_does_not_answer_is_not_live(tmp_path: Path) -> None:
    code, line = health(tmp_path, "api", "--url", "http://127.0.0.1:1", "--timeout", "2")
    assert code == 1
    assert line.startswith("fail: api: URLError")


def test_beat_scheduler_touches_its_heartbeat_at_every_tick(tmp_path: Path) -> None:
    app = Celery("beat", set_as_current=False)
    app.conf.background_heartbeat_dir = str(tmp_path)
    scheduler = HeartbeatScheduler(app, schedule_filename=str(tmp_path / "schedule"))
    assert scheduler.max_interval == BEAT_MAX_INTERVAL
    path = tmp_path / BEAT_FILE
    assert not path.exists()
    # Nothing due: the next tick is at most BEAT_MAX_INTERVAL away.
    assert scheduler.tick() <= BEAT_MAX_INTERVAL
    assert heartbeat_age(path) is not None
    scheduler.close()
    assert not path.exists()
