"""OpenTelemetry tracing: what a process starts when ``OTEL_TRACES_EXPORTER`` turns it on.

This module is light on purpose: it imports nothing of OpenTelemetry. The
settings decide whether tracing is on (``Settings.tracing_enabled``); only
then does a process call ``start_tracing``, which imports ``otel.py`` (the
SDK, the exporters, the instrumentations of Celery, SQLAlchemy and Redis)
and sets them up. With tracing off none of that is imported, no signal
receiver or event listener is added, and no span processor exists.

Where it starts, always after any fork (a ``BatchSpanProcessor``'s thread
does not survive one):

- the worker: in each prefork pool process (``worker_process_init``), or in
  the worker's process for the solo, threads and asyncio pools
  (``worker_init``); stopped, with its spans flushed, when that process stops;
- the API: in the app's lifespan (``app/main.py``), the FastAPI
  instrumentation being added when the app is built;
- the outbox relay: when ``python -m app.core.background relay`` starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """What tracing needs to know; built from the settings by the process that starts it."""

    service_name: str
    # "otlp", "console" and/or "file".
    exporters: tuple[str, ...]
    # The "file" exporter's path (one JSON object per span and line).
    trace_file: str | None = None
    # OTLP over HTTP; None: the exporter's default (http://localhost:4318/v1/traces).
    otlp_endpoint: str | None = None
    # The fraction of the traces that start in this process that are kept.
    ratio: float = 1.0
    # ``messaging.system`` of publish and run spans: the broker ("redis", "rabbitmq"...).
    messaging_system: str = "celery"


class Tracing(Protocol):
    """Tracing running in this process."""

    def shutdown(self) -> None:
        """Export the spans still buffered (the process is ending)."""
        ...


def start_tracing(config: TracingConfig) -> Tracing:
    """Set up the tracer provider, exporters and instrumentations in this process.

    Once per process: a second call returns the first set-up (OpenTelemetry's
    global tracer provider cannot be replaced).
    """
    from . import otel

    return otel.start(config)


def follow_received_messages() -> None:
    """Only W3C propagation, no spans: a worker process whose pool processes run the tasks.

    The lines it logs while it receives a message then carry the message's
    trace id (``RecordingConsumer``); no span processor, no instrumentation.
    """
    from . import otel

    otel.install_propagation()


def instrument_fastapi(app: Any) -> None:
    """Trace ``app``'s requests (a server span per request), before it serves any."""
    from . import otel

    otel.instrument_fastapi(app)


def messaging_system(broker_url: str) -> str:
    """The OpenTelemetry name of the broker a URL points at (``messaging.system``)."""
    scheme = broker_url.split("://", 1)[0].split("+")[-1].lower()
    return {"amqp": "rabbitmq", "amqps": "rabbitmq", "pyamqp": "rabbitmq", "rediss": "redis"}.get(
        scheme, scheme or "celery"
    )
