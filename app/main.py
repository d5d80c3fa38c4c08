"""The FastAPI service. Run: ``uvicorn app.main:app``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

from app.api.task_status import router as task_status_router
from app.core.background import celery_app
from app.core.background.tasks import ping
from app.core.config import Settings, get_settings
from app.core.database import create_tables, engine_from_settings
from app.entities.api import router as entities_router
from app.notifications.api import router as notifications_router


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = engine_from_settings(settings)
        if settings.should_create_tables:
            await create_tables(engine)
        app.state.engine = engine
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        try:
            yield
        finally:
            await engine.dispose()

    app = FastAPI(title="Background tasks example", lifespan=lifespan)
    app.include_router(entities_router)
    app.include_router(notifications_router)
    app.include_router(task_status_router)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        checks: dict[str, Any] = {}
        try:
            async with app.state.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            checks["database"] = f"error: {type(exc).__name__}"
        checks["worker"] = await _worker_answers()
        checks["status"] = "ok" if all(v == "ok" for v in checks.values()) else "degraded"
        return checks

    return app


async def _worker_answers(wait_seconds: float = 3.0) -> str:
    import anyio

    def round_trip() -> str:
        try:
            ping.apply_async().get(timeout=wait_seconds)
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return f"error: {type(exc).__name__}"
        return "ok"

    return await anyio.to_thread.run_sync(round_trip)


app = create_app()
__all__ = ("app", "celery_app", "create_app")
