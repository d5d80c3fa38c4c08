"""A ``redis-server`` of the test run's own: started on a free port, stopped at the end.

The machine's shared Redis may be used by other programs at the same time, so
no test writes to it. Every Redis a test uses is one of these: the session's
(``tests/support/services.py``), or a private one a test restarts or guards
with a password (``tests/reliability``).

A port found free can be taken by another process before the server binds it;
the server then fails to start (or another program answers there), so start
tries again on a new port. A server counts as started only when the process
answering on the port is the one we started (``INFO server`` gives its pid).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

START_ATTEMPTS = 5
START_TIMEOUT = 15.0


def free_port() -> int:
    """A port nobody listens on now (see the module doc for the race, and how start handles it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process of ours, on 127.0.0.1.

    ``durable``: an append-only file fsynced on every write, so that queued and
    unacknowledged messages survive a restart, as a production broker's must.
    """

    def __init__(self, *, password: str | None = None, durable: bool = False) -> None:
        self.password = password
        self.durable = durable
        self.dir = Path(tempfile.mkdtemp(prefix="bgtest-redis-"))
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0, **options: object) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, db=db, password=self.password, **options
        )  # type: ignore[arg-type]

    def blocked_clients(self) -> int:
        """Connections waiting in a blocking command (a worker's BRPOP)."""
        return sum("b" in client.get("flags", "") for client in self.client().client_list())

    # -- lifecycle --------------------------------------------------------

    def start(self) -> RedisServer:
        """Start on a new free port (first start) or on the same port (a restart)."""
        if shutil.which("redis-server") is None:
            raise FileNotFoundError("redis-server is not installed")
        restart = self.port != 0
        errors = []
        for _ in range(1 if restart else START_ATTEMPTS):
            if not restart:
                self.port = free_port()
            if self._spawn():
                return self
            errors.append(f"port {self.port}: {self._log_tail()}")
            self._kill()
        raise RuntimeError("redis-server did not start: " + "; ".join(errors))

    def _spawn(self) -> bool:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
            "--appendonly", "yes" if self.durable else "no",
        ]  # fmt: skip
        if self.durable:
            command += ["--appendfsync", "always"]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # could not bind the port, or a bad option
            if self._is_ours():
                return True
            time.sleep(0.05)
        return False

    def _is_ours(self) -> bool:
        assert self.process is not None
        try:
            with self.client(socket_timeout=1) as client:
                info = client.info("server")
        except redis.RedisError:
            return False
        return int(info.get("process_id", -1)) == self.process.pid

    def _log_tail(self) -> str:
        log = self.dir / "redis.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return lines[-1] if lines else "no log"

    def shutdown(self) -> None:
        """A clean stop (SIGTERM): Redis flushes its append-only file first."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self._kill()

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def restart(self, down_for: float = 1.0) -> None:
        """Stop cleanly, stay down ``down_for`` seconds, start again on the same port."""
        self.shutdown()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
