"""Application settings: the one place that reads the environment.

Everything else takes these values as arguments. The defaults are the embedded
set-up (SQLite and a file-based broker under ``./.data``) so that a fresh clone
runs with no server; production refuses that set-up.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DATA_DIR = Path(".data")

Environment = Literal["development", "test", "production"]
LogFormat = Literal["console", "json"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    environment: Environment = "development"

    database_url: str = f"sqlite+aiosqlite:///./{DATA_DIR}/app.db"
    # Connections each process keeps; unset: 5, or under the asyncio pool one
    # per concurrent task up to 20 (internals/session.py says why).
    database_pool_size: int | None = Field(default=None, ge=1)
    # Connections opened beyond the pool for a while (SQLAlchemy's default).
    database_max_overflow: int = Field(default=10, ge=0)
    # Seconds a task waits for a free connection, then fails with a retriable error.
    database_pool_timeout: float = Field(default=30.0, gt=0)
    database_pool_pre_ping: bool = False
    # Create tables at run time: the API creates the tables of app/models.py at
    # start, the framework its own on first use. Unset: on for SQLite (the
    # embedded default), off elsewhere, where the tables come from the
    # migrations (alembic upgrade head) and the worker and the API check at
    # start that they exist (MissingTablesError).
    database_create_tables: bool | None = None

    celery_broker_url: str = "filesystem://"
    celery_result_backend: str = f"db+sqlite:///{DATA_DIR}/results.db"
    # Polling interval of the embedded file broker, in seconds.
    celery_filesystem_polling_interval: float = Field(default=0.05, gt=0)
    # Redis re-delivers an unacknowledged message after this many seconds. It
    # must exceed every retry delay and task time limit, or a waiting retry or
    # a long task would be delivered twice.
    celery_visibility_timeout: int = Field(default=3600, gt=0)
    celery_result_expires: int = Field(default=86_400, gt=0)

    background_retry_delay_scale: float = Field(default=1.0, ge=0)
    # The asyncio pool logs a task that held the event loop this many seconds
    # without awaiting (every other task on the loop waited as long).
    background_loop_block_warning: float = Field(default=0.1, gt=0)

    # Seconds a dispatch may take before it fails with TaskDispatchError: the
    # broker's (and the result backend's) connect and reply timeouts, and no
    # retry of a failed publish starts after it. A request never hangs on a
    # broker that accepts connections and does not answer.
    background_dispatch_timeout: float = Field(default=5.0, gt=0)
    # What a task registered with delay_on_commit becomes when the broker
    # refuses it after the commit: "outbox" (a row the relay sends later; the
    # change is committed, so its task must not be lost) or "error" (logged as
    # lost, with a metric, and raised from TaskSession.commit()).
    background_after_commit_fallback: Literal["outbox", "error"] = "outbox"

    # Task deduplication by custom task_id (see app/core/background/README.md).
    # Where the leases live: "redis", "database", or "auto" = redis when the
    # broker is Redis, else database. The rule is this setting, not a guess.
    background_dedup_backend: Literal["auto", "redis", "database"] = "auto"
    # Defaults: the broker's Redis, the application's database.
    background_dedup_redis_url: str | None = None
    background_dedup_database_url: str | None = None
    # Extra lease lifetime for the time a message may wait in its queue.
    background_dedup_queue_margin: float = Field(default=3600, ge=0)
    # Task limits (rate_limit=, concurrency=) share the leases' store; a
    # concurrency slot of a process that died is free again after this long.
    background_admission_lease_seconds: float = Field(default=30, gt=0)

    # Final failures kept in the database (operations: dead letters), and for how long.
    background_dead_letters: bool = True
    background_dead_letter_retention_days: float = Field(default=30, gt=0)

    # The operations page and API at /background (app/api/operations.py): HTTP Basic
    # with this user and password. No password: the page answers 403 (never open).
    operations_username: str = "operator"
    operations_password: SecretStr | None = None

    log_format: LogFormat = "console"
    log_level: str = "INFO"
    # Log task arguments and results (Celery's "received"/"succeeded" lines).
    # Off by default: they may hold personal data or secrets.
    background_log_task_arguments: bool = False
    # Celery's "Task ... received" line of each framework task at INFO (else DEBUG):
    # the framework's own line ends every run; this one costs worker CPU per task.
    background_log_received: bool = False

    # Port of the worker's Prometheus /metrics endpoint; 0 or unset: none.
    background_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    background_metrics_host: str = "0.0.0.0"
    # prometheus-client's multiprocess folder. The worker uses (and empties) it,
    # or a temporary folder when unset; the API uses it when set (uvicorn --workers).
    prometheus_multiproc_dir: str | None = None

    # Folder of the relay's and beat's heartbeat files (relay.heartbeat, beat.heartbeat),
    # which `python -m app.core.background health relay|beat` reads. Unset: a folder
    # in the system's temporary directory. One relay and one beat per folder.
    background_heartbeat_dir: str | None = None

    # OpenTelemetry tracing (README: Tracing), by the standard variables. Off unless
    # OTEL_TRACES_EXPORTER names an exporter: "otlp" (OTLP over HTTP), "console",
    # "file" (the framework's JSON lines, to BACKGROUND_TRACE_FILE); comma-separated
    # for several; "none" or unset: off, and nothing of OpenTelemetry is imported.
    otel_sdk_disabled: bool = False
    otel_traces_exporter: str | None = None
    # Unset: "app-api", "app-worker", "app-relay" by process.
    otel_service_name: str | None = None
    # OTLP/HTTP: where spans go (the exporter's default, http://localhost:4318/v1/traces, when
    # unset). OTEL_EXPORTER_OTLP_ENDPOINT is the base URL, "/v1/traces" is added to it.
    otel_exporter_otlp_traces_endpoint: str | None = None
    otel_exporter_otlp_endpoint: str | None = None
    # The fraction of traces kept (1: all), decided where a trace starts; a span
    # whose parent was kept is kept.
    background_trace_ratio: float = Field(default=1.0, ge=0, le=1)
    # The "file" exporter's file: one JSON object per span and line, appended to
    # by every process (tests, local debugging).
    background_trace_file: str | None = None

    @property
    def trace_exporters(self) -> tuple[str, ...]:
        """The exporters OTEL_TRACES_EXPORTER names (empty: tracing is off)."""
        if self.otel_sdk_disabled or not self.otel_traces_exporter:
            return ()
        names = (name.strip().lower() for name in self.otel_traces_exporter.split(","))
        return tuple(name for name in names if name and name != "none")

    @property
    def tracing_enabled(self) -> bool:
        return bool(self.trace_exporters)

    @property
    def otlp_traces_endpoint(self) -> str | None:
        if self.otel_exporter_otlp_traces_endpoint:
            return self.otel_exporter_otlp_traces_endpoint
        if self.otel_exporter_otlp_endpoint:
            return self.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
        return None

    @property
    def heartbeat_dir(self) -> Path:
        """Where the relay and beat write their heartbeat files (``BACKGROUND_HEARTBEAT_DIR``)."""
        if self.background_heartbeat_dir:
            return Path(self.background_heartbeat_dir)
        return Path(tempfile.gettempdir()) / "app-background"

    @property
    def is_embedded_broker(self) -> bool:
        return self.celery_broker_url.startswith("filesystem://")

    @property
    def dedup_backend(self) -> Literal["redis", "database"]:
        """The lease backend that ``BACKGROUND_DEDUP_BACKEND`` selects."""
        if self.background_dedup_backend != "auto":
            return self.background_dedup_backend
        return (
            "redis" if self.celery_broker_url.startswith(("redis://", "rediss://")) else "database"
        )

    @property
    def dedup_store_url(self) -> str:
        """Where the leases (and the task limits, which share their store) live."""
        if self.dedup_backend == "redis":
            return self.background_dedup_redis_url or self.celery_broker_url
        return self.background_dedup_database_url or self.database_url

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def should_create_tables(self) -> bool:
        if self.database_create_tables is not None:
            return self.database_create_tables
        return self.is_sqlite

    @model_validator(mode="after")
    def _check_trace_exporters(self) -> Settings:
        unknown = set(self.trace_exporters) - {"otlp", "console", "file"}
        if unknown:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER: unknown exporter(s) {', '.join(sorted(unknown))}; "
                "use otlp, console, file or none"
            )
        if "file" in self.trace_exporters and not self.background_trace_file:
            raise ValueError("OTEL_TRACES_EXPORTER=file needs BACKGROUND_TRACE_FILE (a path)")
        return self

    @model_validator(mode="after")
    def _refuse_embedded_in_production(self) -> Settings:
        if self.environment == "production":
            if self.is_embedded_broker:
                raise ValueError(
                    "the embedded filesystem:// broker is for development only: it has no "
                    "crash safety and no remote control; set CELERY_BROKER_URL to Redis "
                    "or RabbitMQ in production"
                )
            if self.is_sqlite:
                raise ValueError("SQLite is for development only; set DATABASE_URL in production")
            if self.celery_result_backend.startswith("db+sqlite"):
                raise ValueError(
                    "the SQLite result backend is for development only (one file per host); "
                    "set CELERY_RESULT_BACKEND in production"
                )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
