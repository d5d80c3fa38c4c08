"""Reading a process's Prometheus ``/metrics`` endpoint in tests."""

from __future__ import annotations

import urllib.request
from typing import Any

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
