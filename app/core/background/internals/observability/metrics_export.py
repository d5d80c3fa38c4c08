"""Prometheus metrics out of the process: multiprocess mode, and ``/metrics`` for worker and API.

The values are recorded by ``metrics_hook.py`` and the send path, in the
families of ``monitoring.py``.

Under the prefork pool every task runs in a child process, each with its own
memory, so prometheus-client's multiprocess mode is used: each process writes
its values to files in one folder and the exporter sums them. The worker's main
process prepares that folder before the pool forks (``enable_multiprocess``)
and serves ``/metrics`` from it; a child that exits marks itself dead so that
its in-flight gauge no longer counts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..monitoring import task_metrics

# -- multiprocess mode ----------------------------------------------------------

# Set by ``enable_multiprocess``; inherited by forked children.
_multiprocess_dir: Path | None = None


def enable_multiprocess(directory: str | Path | None, *, wipe: bool) -> Path:
    """Switch this process (and the children it forks) to multiprocess metrics.

    ``directory`` None: a new temporary folder. ``wipe``: delete the values a
    previous run left there (only the process that owns the folder may do so).
    Must run before the first metric value is created in this process.
    """
    from prometheus_client import values

    path = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="prometheus-"))
    if wipe and path.exists():
        for stale in path.glob("*.db"):
            stale.unlink()
    path.mkdir(parents=True, exist_ok=True)
    # prometheus-client reads this variable (here and in forked children), and
    # chose its value class when it was imported: choose again now.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    global _multiprocess_dir
    _multiprocess_dir = path
    return path


def mark_process_dead(pid: int) -> None:
    """Forget the live gauges of an exited process (its counters stay summed)."""
    from prometheus_client import multiprocess

    if _multiprocess_dir is not None:
        multiprocess.mark_process_dead(pid, str(_multiprocess_dir))  # type: ignore[no-untyped-call]


def remove_multiprocess_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _registry() -> Any:
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    if _multiprocess_dir is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(_multiprocess_dir))  # type: ignore[no-untyped-call]
    return registry


def render_metrics() -> tuple[bytes, str]:
    """The current metrics in the text exposition format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    task_metrics()  # every family listed from the first scrape, before any task
    return generate_latest(_registry()), CONTENT_TYPE_LATEST


def start_metrics_server(port: int, host: str) -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; the server object."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=_registry())
    return server
