"""``GET /health``: database, broker and worker, each with its own timeout.

Every check runs concurrently and off the event loop (the broker and the
worker round trip use blocking clients, run in threads), so a dead service
makes ``/health`` slow by at most its timeout, never the whole API.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.background import celery_app
from app.core.background.tasks import ping

router = APIRouter(tags=["health"])
_log = logging.getLogger("app.api.health")

DATABASE_TIMEOUT = 3.0
BROKER_TIMEOUT = 3
WORKER_TIMEOUT = 5.0


async def _check(name: str, check: Callable[[], Awaitable[None]], seconds: float) -> str:
    try:
        with anyio.fail_after(seconds):
            await check()
    except TimeoutError:
        _log.warning("Health check failed", extra={"fields": {"check": name, "error": "timeout"}})
        return f"error: no answer within {seconds:g}s"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        # The body names only the type (it is public); the log has the cause,
        # with any URL password masked by the log formatter.
        _log.warning(
            "Health check failed",
            extra={"fields": {"check": name, "error_type": type(exc).__name__, "error": str(exc)}},
        )
        return f"error: {type(exc).__name__}"
    return "ok"


def _broker_connects() -> None:
    with celery_app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT)


def _worker_answers() -> None:
    ping.apply_async().get(timeout=WORKER_TIMEOUT)


@router.get("/health")
async def health(request: Request, response: Response) -> dict[str, Any]:
    engine: AsyncEngine = request.app.state.engine

    async def database() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def broker() -> None:
        await anyio.to_thread.run_sync(_broker_connects, abandon_on_cancel=True)

    async def worker() -> None:
        await anyio.to_thread.run_sync(_worker_answers, abandon_on_cancel=True)

    checks: dict[str, Any] = {}

    async def run(name: str, check: Callable[[], Awaitable[None]], seconds: float) -> None:
        checks[name] = await _check(name, check, seconds)

    async with anyio.create_task_group() as group:
        group.start_soon(run, "database", database, DATABASE_TIMEOUT)
        group.start_soon(run, "broker", broker, BROKER_TIMEOUT)
        group.start_soon(run, "worker", worker, WORKER_TIMEOUT + 1)
    status = "ok" if all(v == "ok" for v in checks.values()) else "degraded"
    if status != "ok":
        # Load balancers and probes read the code, not the body.
        response.status_code = 503
    return {"status": status, **{k: checks[k] for k in ("database", "broker", "worker")}}
