"""The FastAPI service. Run: ``uvicorn app.main:app``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi_offline import FastAPIOffline
from sqlalchemy.ext.asyncio import async_sessionmaker

from app.api.health import router as health_router
from app.api.operations import router as operations_router
from app.api.task_status import router as task_status_router
from app.core.background import celery_app
from app.core.background.celery_app import tracing_config
from app.core.background.fastapi import TaskSession
from app.core.background.observability import (
    Tracing,
    configure_logging,
    enable_multiprocess_metrics,
    instrument_fastapi,
    render_metrics,
    start_tracing,
)
from app.core.config import Settings, get_settings
from app.core.engine import check_migrated, create_tables, engine_from_settings
from app.entities.api import router as entities_router
from app.notifications.api import router as notifications_router


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # The worker's log format for the API too (uvicorn's loggers included).
    configure_logging(
        settings.log_format,
        settings.log_level,
        log_task_arguments=settings.background_log_task_arguments,
        trace_ids=settings.tracing_enabled,
    )
    if settings.prometheus_multiproc_dir:
        # uvicorn --workers N: every worker writes there, each /metrics sums them.
        enable_multiprocess_metrics(settings.prometheus_multiproc_dir, wipe=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Tracing (OTEL_TRACES_EXPORTER) starts here, in the process that serves,
        # before the engine is made (its statements become spans).
        tracing: Tracing | None = None
        if settings.tracing_enabled:
            tracing = start_tracing(tracing_config(settings, "api"))
        engine = engine_from_settings(settings)
        try:
            if settings.should_create_tables:
                await create_tables(engine)
            else:
                # The tables come from the migrations: a missing one stops the start-up.
                await check_migrated(engine)
            app.state.engine = engine
            app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
            app.state.task_sessions = async_sessionmaker(
                engine, class_=TaskSession, expire_on_commit=False
            )
            yield
        finally:
            await engine.dispose()
            if tracing is not None:
                tracing.shutdown()

    # /docs and /redoc load their JavaScript and CSS from this app
    # (/static-offline-docs, files of the fastapi-offline package), not from a
    # CDN: they render with no internet access.
    app = FastAPIOffline(title="Background tasks example", lifespan=lifespan)
    app.include_router(entities_router)
    app.include_router(notifications_router)
    app.include_router(task_status_router)
    app.include_router(health_router)
    # Dead letters, replay, running and stuck tasks (HTTP Basic: OPERATIONS_PASSWORD).
    app.include_router(operations_router, prefix="/background")
    if settings.tracing_enabled:
        # A server span per request; the tracer provider comes with the lifespan.
        instrument_fastapi(app)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus metrics of this process: tasks dispatched by the API, by task and queue."""
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)

    return app


app = create_app()
__all__ = ("app", "celery_app", "create_app")
