"""The OpenTelemetry side of tracing (imported only when tracing is on: see ``tracing.py``).

What the well-kept instrumentations do, and what this module adds:

- ``opentelemetry-instrumentation-celery``: a PRODUCER span per publish, with
  the context in the message's ``traceparent`` header, and a CONSUMER span per
  run, a child of it. Added here (``_CeleryInstrumentor``): publishes by task
  name (the outbox relay sends tasks it does not import, and the
  instrumentation would leave their span open and attached); the messaging
  conventions on both spans (``messaging.system``, ``messaging.destination.name``,
  ``messaging.message.id``, ``messaging.operation.type``); and span links to
  the first attempt of a retry and to the run a replayed dead letter failed in;
- ``-sqlalchemy`` and ``-redis``: a CLIENT span per statement and command.
  A client span that would start a trace (the worker's polling, heartbeats,
  the relay's reads of an empty outbox) is not kept: ``_sampler``;
- ``-fastapi``: a SERVER span per request (``instrument_fastapi``);
- the framework's attributes on the run span, from the task hooks
  (``TracingHook``): ``background.policy``, ``background.attempt``,
  ``background.outcome`` (success, retry, failure, revoked, deferred);
- the W3C propagation used by ``trace_context`` (outbox rows, dead letters);
- ``JsonLinesSpanExporter``, the ``file`` exporter: one JSON object per span.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.instrumentation.celery import utils as celery_utils
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import Attributes

from .. import trace_context
from ..context import TaskContext
from ..logging import FRAMEWORK_LOGGER_NAME
from ..registry import current_app
from .hooks import TaskHook, hooks
from .tracing import TracingConfig

_log = logging.getLogger(FRAMEWORK_LOGGER_NAME)

# The framework's attributes (span and link).
POLICY = "background.policy"
ATTEMPT = "background.attempt"
OUTCOME = "background.outcome"
LINK_KIND = "background.link"


# -- exporters ---------------------------------------------------------------------------


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One span as the ``file`` exporter writes it."""
    context = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "service": (span.resource.attributes.get("service.name") if span.resource else None),
        "trace_id": format(context.trace_id, "032x") if context else None,
        "span_id": format(context.span_id, "016x") if context else None,
        "parent_span_id": format(parent.span_id, "016x") if parent else None,
        "kind": span.kind.name,
        "start": span.start_time,
        "end": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "links": [
            {
                "trace_id": format(link.context.trace_id, "032x"),
                "span_id": format(link.context.span_id, "016x"),
                "attributes": dict(link.attributes or {}),
            }
            for link in span.links
        ],
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per span to a file, each batch in one write.

    Every process may append to the same file: a write in append mode lands
    whole at the end of the file (a batch is a few kilobytes).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(
            json.dumps(span_record(span), default=str, separators=(",", ":")) + "\n"
            for span in spans
        ).encode()
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(descriptor, data)
            finally:
                os.close(descriptor)
        except OSError:
            _log.exception("Could not write spans to %s", self.path)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


def _exporter(name: str, config: TracingConfig) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name == "file":
        assert config.trace_file, "the file exporter needs BACKGROUND_TRACE_FILE"
        return JsonLinesSpanExporter(config.trace_file)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.otlp_endpoint)


# -- sampling ----------------------------------------------------------------------------


class _NoOrphanClientSpans(Sampler):
    """Keep a root span unless it is a client call (Redis, SQL) outside any trace."""

    def __init__(self, ratio: float) -> None:
        self._roots = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context: context_api.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if kind is SpanKind.CLIENT:
            return SamplingResult(Decision.DROP)
        return self._roots.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"NoOrphanClientSpans({self._roots.get_description()})"


def _sampler(ratio: float) -> Sampler:
    return ParentBased(root=_NoOrphanClientSpans(ratio))


# -- propagation (trace_context's) -------------------------------------------------------


class _W3CPropagation:
    """``trace_context.Propagation`` with OpenTelemetry's configured propagator (W3C)."""

    def current(self) -> dict[str, str]:
        carrier: dict[str, str] = {}
        inject(carrier)
        return carrier

    @contextlib.contextmanager
    def restored(self, headers: Mapping[str, str]) -> Iterator[None]:
        token = context_api.attach(extract(dict(headers)))
        try:
            yield
        finally:
            context_api.detach(token)


def _linked(traceparent: str | None) -> trace.SpanContext | None:
    if not traceparent:
        return None
    context = trace.get_current_span(
        extract({trace_context.TRACEPARENT: traceparent})
    ).get_span_context()
    return context if context.is_valid else None


# -- Celery ----------------------------------------------------------------------------


def _header(request: Any, name: str) -> Any:
    """A custom header of a task's request (Celery also gives them as attributes)."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


# The instrumentation is untyped: its methods are called as Any here.
_UntypedCeleryInstrumentor: Any = CeleryInstrumentor


class _CeleryInstrumentor(_UntypedCeleryInstrumentor):  # type: ignore[misc]
    """Celery's instrumentation, with what the framework's send paths need (module doc)."""

    messaging_system = "celery"

    def _instrument(self, **kwargs: Any) -> None:
        self.messaging_system = kwargs.pop("messaging_system", "celery")
        # Publishes of tasks this process does not import: (span, context token) by id.
        self._by_name: dict[str, tuple[Any, Any]] = {}
        self._by_name_lock = threading.Lock()
        super()._instrument(**kwargs)

    def _trace_before_publish(self, *args: Any, **kwargs: Any) -> None:
        task_id = celery_utils.retrieve_task_id_from_message(kwargs)
        # Celery's instrumentation finds the task by name in this process's registry:
        # without it, it never ends the span and leaves it attached (the relay's case).
        by_name = task_id is not None and celery_utils.retrieve_task_from_sender(kwargs) is None
        token = context_api.attach(context_api.get_current()) if by_name else None
        super()._trace_before_publish(*args, **kwargs)
        span = trace.get_current_span()
        if by_name and task_id is not None:
            with self._by_name_lock:
                self._by_name[task_id] = (span, token)
        if span.is_recording():
            span.set_attributes(
                {
                    "messaging.system": self.messaging_system,
                    "messaging.operation.type": "send",
                    "messaging.destination.name": str(kwargs.get("routing_key") or ""),
                }
            )

    def _trace_after_publish(self, *args: Any, **kwargs: Any) -> None:
        task_id = celery_utils.retrieve_task_id_from_message(kwargs)
        with self._by_name_lock:
            pending = self._by_name.pop(task_id, None) if task_id is not None else None
        if pending is None:
            _UntypedCeleryInstrumentor._trace_after_publish(*args, **kwargs)
            return
        span, token = pending
        span.end()
        # Back to the context before the publish (the instrumentation's attach included).
        context_api.detach(token)

    def _trace_prerun(self, *args: Any, **kwargs: Any) -> None:
        super()._trace_prerun(*args, **kwargs)
        task = celery_utils.retrieve_task(kwargs)
        task_id = celery_utils.retrieve_task_id(kwargs)
        if task is None or task_id is None:
            return
        found = celery_utils.retrieve_context(task, task_id)
        if found is None or not found[0].is_recording():
            return
        span, request = found[0], task.request
        delivery = getattr(request, "delivery_info", None) or {}
        span.set_attributes(
            {
                "messaging.system": self.messaging_system,
                "messaging.operation.type": "process",
                "messaging.message.id": task_id,
                "messaging.destination.name": str(delivery.get("routing_key") or ""),
            }
        )
        for header, kind in (
            (trace_context.FIRST_ATTEMPT_HEADER, "first_attempt"),
            (trace_context.REPLAY_OF_HEADER, "replay_of"),
        ):
            linked = _linked(_header(request, header))
            if linked is not None:
                span.add_link(linked, {LINK_KIND: kind})


# -- the framework's attributes ------------------------------------------------------


class TracingHook(TaskHook):
    """Policy, attempt and outcome on the run's span (the one Celery's instrumentation started)."""

    def _describe(self, ctx: TaskContext, outcome: str | None = None) -> Any:
        span = trace.get_current_span()
        if not span.is_recording():
            return None
        task = current_app().tasks.get(ctx.task_name)
        policy = getattr(getattr(task, "policy", None), "name", None)
        attributes: dict[str, Any] = {ATTEMPT: ctx.attempt}
        if policy:
            attributes[POLICY] = policy
        if outcome is not None:
            attributes[OUTCOME] = outcome
        span.set_attributes(attributes)
        return span

    def before_run(self, ctx: TaskContext) -> None:
        self._describe(ctx)

    def on_success(self, ctx: TaskContext, result: Any, duration: float) -> None:
        self._describe(ctx, "success")

    def on_retry(self, ctx: TaskContext, exc: BaseException, delay: float, duration: float) -> None:
        span = self._describe(ctx, "retry")
        if span is not None:
            span.set_attribute("background.retry_in", round(delay, 3))
            span.record_exception(exc)

    def on_failure(
        self, ctx: TaskContext, exc: BaseException, reason: str, duration: float
    ) -> None:
        span = self._describe(ctx, "failure")
        if span is not None:
            span.set_attribute("background.failure_reason", reason)
            span.record_exception(exc)
            # Celery's instrumentation leaves the task's ``throws`` (the framework's
            # non-retriable errors) unmarked; a final failure is an error all the same.
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))

    def on_revoked(self, ctx: TaskContext, duration: float) -> None:
        self._describe(ctx, "revoked")

    def on_deferred(self, ctx: TaskContext, limit: str, key: str, wait: float) -> None:
        self._describe(ctx, "deferred")


# -- set-up ----------------------------------------------------------------------------


class _Running:
    """Tracing set up in this process (``tracing.Tracing``)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.pid = os.getpid()

    def shutdown(self) -> None:
        """Export what is buffered (the process is ending; a pool process may never exit
        through ``atexit``). The provider and instrumentations stay: OpenTelemetry's
        global provider is set once per process, so a second start (another lifespan
        in the same process, a test's) uses them again. The SDK shuts it down at exit.
        """
        self.provider.force_flush()


_running: _Running | None = None


def start(config: TracingConfig) -> _Running:
    """See ``tracing.start_tracing``; a second call in the same process returns the first."""
    global _running
    if _running is not None and _running.pid == os.getpid():
        return _running
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    resource = Resource.create({"service.name": config.service_name})
    provider = TracerProvider(resource=resource, sampler=_sampler(config.ratio))
    for name in dict.fromkeys(config.exporters):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, config)))
    trace.set_tracer_provider(provider)
    _CeleryInstrumentor().instrument(
        tracer_provider=provider, messaging_system=config.messaging_system
    )
    # Engines made after this by ``sqlalchemy.ext.asyncio.create_async_engine``
    # (the framework's: ``session.create_engine`` calls it through the module).
    # The instrumentation declares SQLAlchemy < 2.1 and would refuse this project's
    # 2.1: its engine events are the same (tests/integration/test_tracing.py).
    SQLAlchemyInstrumentor().instrument(tracer_provider=provider, skip_dep_check=True)
    RedisInstrumentor().instrument(tracer_provider=provider)
    trace_context.install(_W3CPropagation())
    hooks.register(TracingHook())
    _running = _Running(provider)
    return _running


def install_propagation() -> None:
    """See ``tracing.follow_received_messages``."""
    trace_context.install(_W3CPropagation())


def instrument_fastapi(app: Any) -> None:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # The global tracer provider, looked up per request: set by the lifespan's start().
    FastAPIInstrumentor.instrument_app(app, excluded_urls="/metrics")
