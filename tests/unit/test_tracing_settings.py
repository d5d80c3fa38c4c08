"""Tracing is off by default and then installs nothing; the standard variables turn it on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_off_unless_an_exporter_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    assert not Settings().tracing_enabled
    assert not Settings(otel_traces_exporter="none").tracing_enabled
    assert Settings(otel_traces_exporter="otlp").trace_exporters == ("otlp",)
    assert Settings(otel_traces_exporter="otlp, console").trace_exporters == ("otlp", "console")
    # OTEL_SDK_DISABLED wins, as the specification says.
    assert not Settings(otel_traces_exporter="otlp", otel_sdk_disabled=True).tracing_enabled
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "shop")
    settings = Settings()
    assert settings.tracing_enabled
    assert settings.otel_service_name == "shop"


def test_unknown_exporters_and_a_file_exporter_without_a_file_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown exporter"):
        Settings(otel_traces_exporter="jaeger")
    with pytest.raises(ValidationError, match="BACKGROUND_TRACE_FILE"):
        Settings(otel_traces_exporter="file")


def test_the_otlp_endpoint_follows_the_standard_variables() -> None:
    assert Settings().otlp_traces_endpoint is None
    base = Settings(otel_exporter_otlp_endpoint="http://collector:4318/")
    assert base.otlp_traces_endpoint == "http://collector:4318/v1/traces"
    exact = Settings(
        otel_exporter_otlp_endpoint="http://collector:4318",
        otel_exporter_otlp_traces_endpoint="http://other:4318/traces",
    )
    assert exact.otlp_traces_endpoint == "http://other:4318/traces"


# Builds everything a process builds with tracing off: the API (app and lifespan),
# the Celery app and a worker's signal set-up, then says what got installed.
PROBE = """
import asyncio, json, sys
WATCHED = (
    "opentelemetry.sdk.trace",
    "opentelemetry.instrumentation",
    "opentelemetry.exporter",
    "app.core.background.internals.observability.otel",
)
from celery import signals
from fastapi.testclient import TestClient
from app.main import create_app
from app.core.background import celery_app
from app.core.background.internals import trace_context
from app.core.background.internals.observability.hooks import hooks

app = create_app()
with TestClient(app) as client:
    client.get("/metrics")
signals.worker_init.send(sender=None)
signals.worker_process_init.send(sender=None)
receivers = [
    repr(receiver)
    for signal in (signals.before_task_publish, signals.task_prerun, signals.worker_process_init)
    for receiver in signal.receivers
]
from opentelemetry import trace
print(json.dumps({
    "modules": sorted(
        name for name in sys.modules
        if name.startswith(WATCHED)
    ),
    "provider": type(trace.get_tracer_provider()).__name__,
    "propagation": trace_context.active(),
    "hooks": [type(hook).__name__ for hook in hooks],
    "receivers": receivers,
    "fastapi_instrumented": getattr(app, "_is_instrumented_by_opentelemetry", False),
}))
"""


def test_tracing_off_installs_nothing(tmp_path: Path) -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OTEL_", "BACKGROUND_TRACE"))
    }
    env.update(
        PYTHONPATH=str(ROOT),
        DATABASE_URL="sqlite+aiosqlite://",
        CELERY_BROKER_URL="memory://",
        CELERY_RESULT_BACKEND="cache+memory://",
        DATABASE_CREATE_TABLES="true",  # the app creates its tables: no migrations to run
    )
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # Nothing of the SDK's tracing, the instrumentations or the exporters is even imported
    # (redis-py 8 imports the SDK's metrics when the SDK is installed: not ours).
    assert found["modules"] == []
    assert found["provider"] == "ProxyTracerProvider"
    assert found["propagation"] is False
    assert "TracingHook" not in found["hooks"]
    hooked = ("Instrumentor", "start_tracing", "stop_tracing", "follow_received")
    assert not [r for r in found["receivers"] if any(word in r for word in hooked)]
    assert found["fastapi_instrumented"] is False
