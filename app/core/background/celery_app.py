"""The Celery application: configuration from the settings, and worker signals.

``celery -A app.core.background.celery_app worker`` and ``... flower`` use it
as it is; every Celery option and command-line flag still applies.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import click
from celery import Celery, signals
from click.core import ParameterSource
from kombu import Queue

from app.core.config import DATA_DIR, Settings, get_settings

from .internals.admission.gate import admission
from .internals.admission.stores import store_from_settings as admission_store_from_settings
from .internals.base import route_to_declared_queue
from .internals.delivery.dedup import connect_worker_signals as connect_dedup_signals
from .internals.delivery.dedup import deduplicator, store_from_settings
from .internals.discovery import find_task_modules
from .internals.event_loop import worker_loop
from .internals.exceptions import MissingTablesError
from .internals.logging import (
    FRAMEWORK_LOGGER_NAME,
    LOG_RECEIVED_SETTING,
    build_quiet_tracers,
    configure_logging,
    worker_log_level,
)
from .internals.observability.hooks import hooks
from .internals.observability.metrics_export import (
    enable_multiprocess,
    mark_process_dead,
    remove_multiprocess_dir,
    start_metrics_server,
)
from .internals.observability.metrics_hook import MetricsHook
from .internals.observability.tracing import (
    Tracing,
    TracingConfig,
    follow_received_messages,
    messaging_system,
    start_tracing,
)
from .internals.operations import running_book
from .internals.operations.dead_letters import RETENTION_SETTING
from .internals.operations.failures import DeadLetterRecorder
from .internals.operations.running import WorkerHeartbeat
from .internals.operations.status import on_before_publish
from .internals.registry import current_app, use_app
from .internals.retry import QUEUE_NAMES, RETRY_POLICIES
from .internals.schema import check_worker_tables
from .internals.session import DatabaseConfig, database, table_creation
from .internals.transport.deadline import stop_after_deadline
from .internals.transport.file_broker import broker_folders
from .internals.transport.loop_writes import close_on_this_loop as close_result_writes_on_this_loop

APP_PACKAGE_DIR = Path(__file__).resolve().parents[2]

# Pools whose green threads would share one asyncio loop and one connection
# pool across concurrently running tasks: db tasks are not safe there.
UNSAFE_POOLS = ("gevent", "eventlet")


# Seconds the worker's start-up check of its tables may take (a database that
# does not answer is reported by the tasks instead).
_TABLE_CHECK_TIMEOUT = 10.0


def build_celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for the framework's guarantees (see README: delivery)."""
    longest_wait = max(
        max(p.longest_delay * settings.background_retry_delay_scale, p.time_limit)
        for p in RETRY_POLICIES.values()
    )
    if settings.celery_broker_url.startswith(("redis://", "rediss://")) and (
        settings.celery_visibility_timeout <= longest_wait
    ):
        raise ValueError(
            f"CELERY_VISIBILITY_TIMEOUT={settings.celery_visibility_timeout}s must exceed the "
            f"longest retry delay or time limit ({longest_wait:.0f}s), or Redis re-delivers "
            "waiting and running tasks"
        )
    config: dict[str, Any] = {
        "broker_url": settings.celery_broker_url,
        "result_backend": settings.celery_result_backend,
        # JSON only: a pickle message from the broker would be code execution.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # At-least-once: acknowledge after the run, run again if the process
        # dies, but count that against the task's retries so that a task that
        # kills its worker every time does not loop forever.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_retry_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "broker_connection_retry_on_startup": True,
        "task_track_started": True,
        # Stores the attempt (retries) with every state, for the task status API.
        "result_extended": True,
        "result_expires": settings.celery_result_expires,
        "task_queues": [Queue(name, routing_key=name) for name in QUEUE_NAMES],
        "task_default_queue": "default",
        "task_routes": (route_to_declared_queue,),
        "task_default_exchange_type": "direct",
        "task_create_missing_queues": False,
        "worker_hijack_root_logger": False,
        # Celery's consumer, reporting undecodable messages too (dead letters).
        "worker_consumer": "app.core.background.internals.operations.failures:RecordingConsumer",
        "background_retry_delay_scale": settings.background_retry_delay_scale,
        # The asyncio pool (internals/asyncio_pool.py) logs a task that held its loop this long.
        "background_loop_block_warning": settings.background_loop_block_warning,
        # Bounded dispatch (internals/delivery/publish.py): a failed publish is retried
        # (a broker restart of a second or two is ridden out) until the
        # dispatch timeout, never longer; each attempt's sockets time out too.
        "background_dispatch_timeout": settings.background_dispatch_timeout,
        "background_log_task_arguments": settings.background_log_task_arguments,
        LOG_RECEIVED_SETTING: settings.background_log_received,
        # Dead letters older than this are deleted by background.prune_dead_letters (daily).
        RETENTION_SETTING: settings.background_dead_letter_retention_days * 86400,
        "background_after_commit_fallback": settings.background_after_commit_fallback,
        # celery beat: Celery's persistent scheduler, touching a heartbeat file in this
        # folder at every tick (``health beat``; internals/operations/beat_heartbeat.py).
        "beat_scheduler": (
            "app.core.background.internals.operations.beat_heartbeat:HeartbeatScheduler"
        ),
        "background_heartbeat_dir": str(settings.heartbeat_dir),
        "task_publish_retry_policy": {
            "max_retries": None,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 1,
            "errback": stop_after_deadline,
        },
        "broker_connection_timeout": settings.background_dispatch_timeout,
        "redis_socket_connect_timeout": settings.background_dispatch_timeout,
    }
    if settings.is_embedded_broker:
        config["broker_transport"] = "app.core.background.internals.transport.file_broker:Transport"
        config["broker_transport_options"] = {
            **broker_folders(DATA_DIR / "broker"),
            "polling_interval": settings.celery_filesystem_polling_interval,
        }
    else:
        config["broker_transport_options"] = {
            "visibility_timeout": settings.celery_visibility_timeout
        }
    if settings.celery_broker_url.startswith(("redis://", "rediss://")):
        # kombu's Redis transport, fixed to survive a broker restart under a
        # running worker (internals/transport/redis_broker.py).
        config["broker_transport"] = (
            "app.core.background.internals.transport.redis_broker:Transport"
        )
        # kombu's Redis default is no timeout: a publish to a server that
        # accepts the connection and never answers would wait forever. The
        # worker's BRPOP polls (1 s) well inside it.
        config["broker_transport_options"].update(
            socket_timeout=settings.background_dispatch_timeout,
            socket_connect_timeout=settings.background_dispatch_timeout,
        )
    if settings.celery_result_backend.startswith("db+sqlite"):
        config["database_engine_options"] = {"connect_args": {"timeout": 30}}
    return config


def tracing_config(settings: Settings, role: str) -> TracingConfig:
    """What tracing needs in a process of ``role`` (api, worker, relay); on or not."""
    return TracingConfig(
        service_name=settings.otel_service_name or f"app-{role}",
        exporters=settings.trace_exporters,
        trace_file=settings.background_trace_file,
        otlp_endpoint=settings.otlp_traces_endpoint,
        ratio=settings.background_trace_ratio,
        messaging_system=messaging_system(settings.celery_broker_url),
    )


def create_celery_app(settings: Settings | None = None) -> Celery:
    """The framework's Celery app, and everything this process needs to use it.

    The one place with effects beyond building the app object: it reads the
    settings (``settings`` None: from the environment), says which app the
    decorators register on, configures the database and deduplication
    runtimes (nothing connects yet), creates ``./.data`` for the embedded
    defaults, registers the metrics hook and connects the worker's signals.
    """
    settings = settings or get_settings()
    app = Celery(
        "app",
        loader="app.core.background.internals.discovery:TaskModuleLoader",
        amqp="app.core.background.internals.delivery.publish:BoundedAMQP",
        include=find_task_modules(APP_PACKAGE_DIR, "app"),
    )
    app.conf.update(build_celery_config(settings))
    use_app(app)
    database.configure(
        DatabaseConfig(
            url=settings.database_url,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            pool_timeout=settings.database_pool_timeout,
            pool_pre_ping=settings.database_pool_pre_ping,
        )
    )
    # Tables on a database server: created at run time, or made by the migrations
    # and checked (DATABASE_CREATE_TABLES; a SQLite file always gets them).
    table_creation.configure(settings.should_create_tables)
    deduplicator.configure(
        store_from_settings(settings), queue_margin=settings.background_dedup_queue_margin
    )
    admission.configure(
        admission_store_from_settings(settings), settings.background_admission_lease_seconds
    )
    if (
        settings.is_embedded_broker
        or settings.is_sqlite
        or settings.celery_result_backend.startswith("db+sqlite")
    ):
        # SQLite and the file broker need their folder; the result backend opens
        # its file before the broker creates anything.
        DATA_DIR.mkdir(exist_ok=True)
    WorkerSignals(settings).connect()
    return app


def refuse_unsafe_pools(conf: Any = None, options: Any = None, **_: Any) -> None:
    """``celeryd_init``: stop a worker started with a green-thread pool, saying why."""
    options = options or {}
    chosen = options.get("pool") or options.get("pool_cls") or (conf or {}).get("worker_pool")
    pool = getattr(chosen, "__module__", "") if isinstance(chosen, type) else str(chosen or "")
    if any(name in pool for name in UNSAFE_POOLS):
        # Signal receivers' exceptions are logged and swallowed by Celery;
        # SystemExit is not, and stops the worker before it consumes anything.
        raise SystemExit(
            f"the {pool!r} pool is not supported: async db tasks need a real thread or "
            "process per task, or the framework's asyncio pool; use --pool=prefork (default), "
            "solo, threads, or -P custom with "
            "CELERY_CUSTOM_WORKER_POOL=app.core.background.pool:AsyncioPool"
        )


def record_sent(headers: Any = None, routing_key: Any = None, **_: Any) -> None:
    """``before_task_publish``: record ``SENT``, so the status API tells queued from unknown."""
    on_before_publish(current_app(), headers, routing_key)


def _loglevel_on_command_line() -> bool | None:
    """Whether ``-l``/``--loglevel`` was on the command line; None outside a Celery command."""
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if "loglevel" in ctx.params:
            return ctx.get_parameter_source("loglevel") not in (None, ParameterSource.DEFAULT)
        ctx = ctx.parent
    return None


class WorkerSignals:
    """What this process does at Celery's signals: publish, logging set-up, worker life."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Whether this Celery command was given -l/--loglevel, decided in the main
        # process (which runs inside click) and inherited by forked pool processes.
        self.loglevel_given: bool | None = None
        # The worker's metrics endpoint and the folder it created, while it runs.
        self.metrics_server: Any = None
        self.metrics_dir: Path | None = None
        self.heartbeat: WorkerHeartbeat | None = None
        # Tracing in this process (a prefork pool process, or a worker without one).
        self.tracing: Tracing | None = None

    # Celery's signals and the hook registry belong to the process: connected once,
    # by the first app built, however many apps a process builds.
    connected: ClassVar[bool] = False

    def connect(self) -> None:
        if WorkerSignals.connected:
            return
        WorkerSignals.connected = True
        hooks.register(MetricsHook())
        connect_dedup_signals()
        if self.settings.background_dead_letters:
            DeadLetterRecorder().connect()
        # Celery's signals hold receivers weakly by default: these are bound methods.
        signals.celeryd_init.connect(refuse_unsafe_pools, weak=False)
        signals.before_task_publish.connect(record_sent, weak=False)
        signals.setup_logging.connect(self.setup_logging, weak=False)
        signals.worker_init.connect(self.check_tables, weak=False)
        signals.worker_process_init.connect(self.quiet_tracers, weak=False)
        signals.worker_init.connect(self.start_metrics_endpoint, weak=False)
        signals.worker_process_shutdown.connect(self.forget_child_gauges, weak=False)
        signals.worker_shutdown.connect(self.stop_metrics_endpoint, weak=False)
        signals.worker_process_shutdown.connect(self.close_process_resources, weak=False)
        signals.worker_shutdown.connect(self.close_process_resources, weak=False)
        if self.settings.celery_result_backend.startswith("db+"):
            # A database result backend keeps the running set by these (Redis:
            # its state script); connected only then, off every other task start.
            signals.task_prerun.connect(running_book.on_task_prerun, weak=False)
            signals.task_postrun.connect(running_book.on_task_postrun, weak=False)
        signals.worker_init.connect(self.clear_stale_heartbeat, weak=False)
        signals.worker_ready.connect(self.start_heartbeat, weak=False)
        signals.worker_shutdown.connect(self.stop_heartbeat, weak=False)
        if self.settings.tracing_enabled:
            # After the fork (a span processor's thread does not survive one).
            signals.worker_init.connect(self.start_tracing_without_pool, weak=False)
            signals.worker_process_init.connect(self.start_tracing, weak=False)
            signals.worker_process_shutdown.connect(self.stop_tracing, weak=False)
            signals.worker_shutdown.connect(self.stop_tracing, weak=False)

    def setup_logging(self, loglevel: Any = None, **_: Any) -> None:
        # Celery passes WARNING when -l is absent: LOG_LEVEL decides then (README: LOG_LEVEL).
        if (given := _loglevel_on_command_line()) is not None:
            self.loglevel_given = given
        configure_logging(
            self.settings.log_format,
            worker_log_level(loglevel, self.loglevel_given, self.settings.log_level),
            log_task_arguments=self.settings.background_log_task_arguments,
            trace_ids=self.settings.tracing_enabled,
        )

    def quiet_tracers(self, sender: Any = None, **_: Any) -> None:
        """A prefork child's tracers, like its consumer's: no success record for ours."""
        build_quiet_tracers(current_app(), sender if isinstance(sender, str) else None)

    def check_tables(self, **_: Any) -> None:
        """Stop a worker whose tables the migrations have not made, saying so.

        Only when the tables are not created at run time (``DATABASE_CREATE_TABLES``).
        A database that does not answer yet is not a reason to stop: tasks
        report it, as they would later.
        """
        settings = self.settings
        if settings.should_create_tables:
            return
        dedup_url = settings.dedup_store_url if settings.dedup_backend == "database" else None
        check = check_worker_tables(
            settings.database_url, dedup_url, settings.background_dead_letters
        )
        try:
            # On a thread of its own: the main thread's event loop state stays as it was.
            with ThreadPoolExecutor(1, thread_name_prefix="table-check") as thread:
                thread.submit(asyncio.run, asyncio.wait_for(check, _TABLE_CHECK_TIMEOUT)).result()
        except MissingTablesError as exc:
            # Celery logs and swallows a receiver's Exception; SystemExit stops the worker.
            raise SystemExit(f"worker not started: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - the database may come up later
            logging.getLogger(FRAMEWORK_LOGGER_NAME).warning(
                "Could not check the tables at start",
                extra={"fields": {"error": f"{type(exc).__name__}: {exc}"}},
            )

    def start_tracing(self, **_: Any) -> None:
        """Tracing in this process: a prefork pool process (``worker_process_init``)."""
        if self.tracing is None:
            self.tracing = start_tracing(tracing_config(self.settings, "worker"))

    def start_tracing_without_pool(self, sender: Any = None, **_: Any) -> None:
        """``worker_init``: tracing in the worker's process, unless prefork children run tasks."""
        pool = getattr(sender, "pool_cls", None)
        name = pool if isinstance(pool, str) else f"{getattr(pool, '__module__', '')}"
        if "prefork" not in name:
            self.start_tracing()
        else:
            # The pool processes trace the runs; this one receives the messages.
            follow_received_messages()

    def stop_tracing(self, **_: Any) -> None:
        tracing, self.tracing = self.tracing, None
        if tracing is not None:
            tracing.shutdown()

    def start_metrics_endpoint(self, **_: Any) -> None:
        """Serve the pool's summed metrics from the main process, before the pool forks."""
        settings = self.settings
        if not settings.background_metrics_port:
            return
        folder = enable_multiprocess(settings.prometheus_multiproc_dir, wipe=True)
        if not settings.prometheus_multiproc_dir:
            self.metrics_dir = folder
        self.metrics_server = start_metrics_server(
            settings.background_metrics_port, settings.background_metrics_host
        )

    def forget_child_gauges(self, pid: int | None = None, **_: Any) -> None:
        mark_process_dead(pid or os.getpid())

    def stop_metrics_endpoint(self, **_: Any) -> None:
        server, self.metrics_server = self.metrics_server, None
        if server is not None:
            server.shutdown()
        folder, self.metrics_dir = self.metrics_dir, None
        if folder is not None:
            remove_multiprocess_dir(folder)

    def clear_stale_heartbeat(self, sender: Any = None, **_: Any) -> None:
        """A worker restarted after a crash: its predecessor's beat is not its own (``health``)."""
        hostname = getattr(sender, "hostname", None)
        if hostname:
            WorkerHeartbeat(current_app(), hostname).clear()

    def start_heartbeat(self, sender: Any = None, **_: Any) -> None:
        """The worker's main process says it is alive (operations: stuck tasks)."""
        hostname = getattr(sender, "hostname", None)
        if hostname and self.heartbeat is None:
            self.heartbeat = WorkerHeartbeat(current_app(), hostname)
            self.heartbeat.start()

    def stop_heartbeat(self, **_: Any) -> None:
        heartbeat, self.heartbeat = self.heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()

    def close_process_resources(self, **_: Any) -> None:
        """Give back the slots of ended runs, close what lives on the loop of this process
        (prefork child, solo or asyncio pool worker) and stop it."""
        admission.keeper.flush()
        worker_loop.stop(_close_loop_resources())


async def _close_loop_resources() -> None:
    """On the loop, before it stops: the engine's connections, the asyncio pool's result writers."""
    await database.dispose()
    await close_result_writes_on_this_loop()


celery_app = create_celery_app()
