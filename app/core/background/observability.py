"""Hooks around task runs, the framework's logging set-up, and its Prometheus metrics."""

from .internals.logging import configure_logging, mask_url_passwords
from .internals.monitoring import StatsCounter, TaskMetrics, Timer, task_metrics
from .internals.observability.hooks import TaskHook, hooks
from .internals.observability.metrics_export import (
    enable_multiprocess as enable_multiprocess_metrics,
)
from .internals.observability.metrics_export import render_metrics
from .internals.observability.tracing import (
    Tracing,
    TracingConfig,
    instrument_fastapi,
    start_tracing,
)

__all__ = (
    # hooks
    "TaskHook",
    "hooks",
    # logging
    "configure_logging",
    "mask_url_passwords",
    # tracing (OpenTelemetry; imported only when started)
    "Tracing",
    "TracingConfig",
    "start_tracing",
    "instrument_fastapi",
    # metrics
    "TaskMetrics",
    "task_metrics",
    "render_metrics",
    "enable_multiprocess_metrics",
    "StatsCounter",
    "Timer",
)
