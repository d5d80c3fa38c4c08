"""A Redis-shared CircuitBreaker: one breaker for every process, on the real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from app.core.background.extras import CircuitBreaker, CircuitBreakerOpen
from tests.support.services import Services

pytestmark = pytest.mark.redis

# Another process with its own breaker on the same Redis key. It reads commands
# ("fail", "call", "state") on stdin and answers one JSON line each, so that the
# import cost is paid once, outside the breaker's timings.
OTHER_PROCESS = """
import json, sys
import redis
from app.core.background.extras import CircuitBreaker, CircuitBreakerOpen

url, name, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
breaker = CircuitBreaker(name=name, failure_threshold=2, recovery_timeout=timeout,
                         redis=redis.Redis.from_url(url))
def down():
    raise ConnectionError("down")
for line in sys.stdin:
    action = line.strip()
    report = {"state_before": breaker.state}
    try:
        if action == "fail":
            breaker.call(down)
        elif action == "call":
            report["result"] = breaker.call(lambda: "called")
    except CircuitBreakerOpen as exc:
        report["open"] = exc.retry_after
    except ConnectionError:
        report["failed"] = True
    report["state_after"] = breaker.state
    print(json.dumps(report), flush=True)
"""


class OtherProcess:
    def __init__(self, services: Services, name: str, timeout: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", OTHER_PROCESS, services.redis_url, name, str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy(),
        )  # fmt: skip
        self.ask("state")  # imported and connected

    def ask(self, action: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(action + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, "the other process died"
        report: dict[str, Any] = json.loads(line)
        return report

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def spawn(redis_service: Services) -> Iterator[Any]:
    started: list[OtherProcess] = []

    def start(name: str, timeout: float) -> OtherProcess:
        started.append(OtherProcess(redis_service, name, timeout))
        return started[-1]

    yield start
    for other in started:
        other.close()


def wait_state(breaker: CircuitBreaker, state: str, timeout: float) -> bool:
    """Poll the shared state (bounded) instead of sleeping past the recovery timeout."""
    deadline = time.monotonic() + timeout
    while breaker.state != state:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def fail_once(breaker: CircuitBreaker) -> None:
    def down() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        breaker.call(down)


def test_two_processes_share_one_breaker(redis_service: Services, spawn: Any) -> None:
    name = f"shared-{uuid.uuid4().hex[:8]}"
    timeout = 1.0
    here = CircuitBreaker(
        name=name, failure_threshold=2, recovery_timeout=timeout, redis=redis_service.redis()
    )
    other = spawn(name, timeout)

    # One failure here, one in the other process: together they reach the threshold.
    fail_once(here)
    first = other.ask("fail")
    assert first["failed"] is True
    assert first["state_after"] == "open"
    assert here.state == "open"

    # Open for everybody: the other process is refused without calling the service.
    refused = other.ask("call")
    assert "result" not in refused
    assert 0 < refused["open"] <= timeout
    with pytest.raises(CircuitBreakerOpen):
        here.call(lambda: "not called")

    # After the recovery timeout the other process's probe succeeds and closes it for all.
    assert wait_state(here, "half_open", timeout + 10)
    probe = other.ask("call")
    assert probe["result"] == "called"
    assert probe["state_after"] == "closed"
    assert here.state == "closed"
    assert here.call(lambda: "again") == "again"


def test_only_one_process_probes_when_half_open(redis_service: Services, spawn: Any) -> None:
    name = f"probe-{uuid.uuid4().hex[:8]}"
    client = redis_service.redis()
    here = CircuitBreaker(name=name, failure_threshold=1, recovery_timeout=0.5, redis=client)
    other = spawn(name, 0.5)
    fail_once(here)
    assert wait_state(here, "half_open", 10)

    def probe_here() -> str:
        # While this process probes, the other is refused.
        refused = other.ask("call")
        assert "open" in refused
        assert "result" not in refused
        return "up"

    assert here.call(probe_here) == "up"
    assert here.state == "closed"


def test_reset_clears_the_shared_state(redis_service: Services, spawn: Any) -> None:
    name = f"reset-{uuid.uuid4().hex[:8]}"
    here = CircuitBreaker(name=name, failure_threshold=1, redis=redis_service.redis())
    other = spawn(name, 30)
    fail_once(here)
    assert other.ask("call")["state_before"] == "open"
    here.reset()
    assert other.ask("call")["result"] == "called"
