"""scripts/dev.sh: the API and a worker on the embedded default, stopped together.

The script runs for real, from a temporary checkout (symbolic links to this
one's scripts, app and .venv), so its ./.data is a fresh folder and the
developer's own is left alone. It runs in a session of its own: the test can
tell when every process it started (uvicorn, the worker and its pool) is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVICE_VARIABLES = ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
START_TIMEOUT = 90.0
# A stop is prompt when everything is gone well within the script's own grace
# period for a warm shutdown (DEV_STOP_TIMEOUT, 10 s).
STOP_TIMEOUT = 20.0
PORT_ATTEMPTS = 3


def _signals_as_from_a_terminal() -> None:
    """In the child: INT neither blocked nor ignored, as when a developer starts the script.

    A shell cannot trap a signal that was ignored when it started, and a child
    inherits a blocked mask; after the suite's in-process worker and pool
    tests the test process may pass either on (the INT case failed only in
    full runs).
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class DevScript:
    def __init__(self, checkout: Path, *args: str) -> None:
        self.checkout = checkout
        self.args = args
        self.log_path = checkout / "dev.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def spawn(self) -> subprocess.Popen[bytes]:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
        env.update(
            ENVIRONMENT="development",
            HOST="127.0.0.1",
            PORT=str(self.port),
            PYTHONPATH=str(ROOT),
            DATABASE_CREATE_TABLES="true",
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(self.checkout / "scripts" / "dev.sh"), *self.args],
                cwd=self.checkout,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_signals_as_from_a_terminal,
            )
        return self.process

    def start(self) -> None:
        """Until the API answers and the worker is ready; a new port if ours was taken."""
        for _ in range(PORT_ATTEMPTS):
            process = self.spawn()
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    break
                if self.api_answers() and " ready." in self.log():
                    return
                time.sleep(0.2)
            else:
                raise AssertionError(f"dev.sh not ready in {START_TIMEOUT}s:\n{self.log()}")
            if "address already in use" not in self.log():
                raise AssertionError(f"dev.sh exited with {process.returncode}:\n{self.log()}")
            self.wait_all_gone()
        raise AssertionError(f"no free port in {PORT_ATTEMPTS} attempts:\n{self.log()}")

    def api_answers(self) -> bool:
        url = f"http://127.0.0.1:{self.port}/openapi.json"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def group_alive(self) -> bool:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def wait_all_gone(self, timeout: float = STOP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.group_alive():
            if time.monotonic() >= deadline:
                raise AssertionError(f"processes of dev.sh still running after {timeout}s")
            time.sleep(0.1)

    def kill_all(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("scripts", "app", ".venv", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


@pytest.fixture
def dev(checkout: Path) -> Iterator[list[DevScript]]:
    started: list[DevScript] = []
    yield started
    for script in started:
        script.kill_all()


# Its own waits: up to 3 starts x 90 + stop 20 + all gone 20 + cleanup 10 = 320 s.
@pytest.mark.timeout(360)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_to_the_script_stops_the_api_and_the_worker(
    checkout: Path, dev: list[DevScript], signum: signal.Signals
) -> None:
    script = DevScript(checkout)
    dev.append(script)
    script.start()
    assert script.process is not None
    assert (checkout / ".data" / "app.db").is_file()  # its own folder, not the developer's

    script.process.send_signal(signum)  # to the script alone, as `kill PID` does
    try:
        code = script.process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"dev.sh still running {STOP_TIMEOUT}s after {signum.name}:\n{script.log()[-3000:]}"
        ) from None
    assert code != 0
    script.wait_all_gone()
    assert not script.api_answers()


# Its own waits: exit 90 + all gone 20 + cleanup 10 = 120 s.
@pytest.mark.timeout(180)
def test_a_worker_that_dies_at_start_stops_the_api(checkout: Path, dev: list[DevScript]) -> None:
    script = DevScript(checkout, "--include", "tests.support.broken.tasks")
    dev.append(script)
    process = script.spawn()
    try:
        code = process.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"dev.sh still running {START_TIMEOUT}s after its worker died:\n{script.log()[-3000:]}"
        ) from None
    log = script.log()
    assert code != 0, log
    assert "cannot import task module 'tests.support.broken.tasks'" in log
    assert "dev.sh: the worker exited" in log
    script.wait_all_gone()
