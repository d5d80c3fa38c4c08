"""Reading a process's Prometheus ``/metrics`` endpoint in tests."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from typing import Any

from app.core.background.internals.operations.worker_process import WorkerProcess
from tests.support.redis_server import free_port

PORT_ATTEMPTS = 3

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


def parse_metrics(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def start_serving_metrics(start: Callable[[int], WorkerProcess]) -> tuple[WorkerProcess, int]:
    """``start(port)``, a worker whose metrics endpoint answers; on another port if it was taken.

    A port found free may be bound by another process before the worker binds
    it (the race tests/support/redis_server.py describes): try a new one.
    """
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        worker = start(port)
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 10
        while not _answers(url) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _answers(url):  # answering is enough: the body is empty before the first task
            return worker, port
        log = worker.log()
        worker.stop()
        if "address already in use" not in log.lower():
            raise AssertionError(f"no metrics endpoint:\n{log[-3000:]}")
    raise AssertionError(f"no free metrics port in {PORT_ATTEMPTS} attempts")


def _answers(url: str) -> bool:
    try:
        http_get(url)
    except OSError:
        return False
    return True
