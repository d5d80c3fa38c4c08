"""A real Celery worker in a child process, for tests and benchmarks.

Starts ``celery -A app.core.background.celery_app worker`` with the given
environment, waits until it says it is ready, and stops it (warm shutdown,
then SIGKILL of its whole process group) when asked.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

CELERY_APP = "app.core.background.celery_app"


class WorkerStartError(RuntimeError):
    """The worker exited or did not become ready in time."""


class WorkerProcess:
    """One ``celery worker`` process (and its pool children)."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: Sequence[str] = (),
        include: Sequence[str] = (),
        loglevel: str | None = "INFO",
        extra_args: Sequence[str] = (),
        cwd: str | Path | None = None,
    ) -> None:
        self.env = {**os.environ, **env}
        self.name = f"w{uuid.uuid4().hex[:8]}@%h"
        self.cwd = cwd
        self.command = [
            sys.executable, "-m", "celery", "-A", CELERY_APP, "worker",
            "--pool", pool, "--concurrency", str(concurrency),
            # None: no --loglevel, as ``celery -A ... worker`` is started by hand.
            *(["--loglevel", loglevel] if loglevel is not None else []),
            "--hostname", self.name, "--without-gossip", "--without-mingle",
            *(["--queues", ",".join(queues)] if queues else []),
            *(["--include", ",".join(include)] if include else []),
            *extra_args,
        ]  # fmt: skip
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open for the worker's life
            prefix="worker-", suffix=".log", delete=False
        )
        self.log_path = Path(self._log.name)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "worker not started"
        return self.process.pid

    def log(self) -> str:
        """Everything the worker has printed so far."""
        return self.log_path.read_text(errors="replace")

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, output = self.process.returncode, self.log()[-4000:]
                self.stop()
                raise WorkerStartError(f"worker exited with {code}:\n{output}")
            if " ready." in self.log():
                return self
            time.sleep(0.1)
        output = self.log()[-4000:]
        self.stop()
        raise WorkerStartError(f"worker not ready after {timeout}s:\n{output}")

    def kill(self) -> None:
        """SIGKILL the worker and its pool children at once (a crash)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of the group if it lingers."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.wait(10)
        self._log.close()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
