"""``GET /health``: database, broker and worker; ``GET /ready``: database and broker.

``/ready`` is the API's readiness, for a load balancer or a Kubernetes
readiness probe: can this process serve a request that writes a row and sends
a task? It leaves the worker out: no worker up does not make the API unable to
accept work (tasks wait in the broker), and an API taken out of rotation for it
would turn a worker outage into an API outage. ``/health`` keeps the worker
round trip, for a person or a monitor asking "does the whole system work?".

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


def _database_check(request: Request) -> Callable[[], Awaitable[None]]:
    engine: AsyncEngine = request.app.state.engine

    async def database() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    return database


async def _broker() -> None:
    await anyio.to_thread.run_sync(_broker_connects, abandon_on_cancel=True)


async def _worker() -> None:
    await anyio.to_thread.run_sync(_worker_answers, abandon_on_cancel=True)


async def _run_checks(
    response: Response, checks: dict[str, tuple[Callable[[], Awaitable[None]], float]]
) -> dict[str, Any]:
    results: dict[str, str] = {}

    async def run(name: str, check: Callable[[], Awaitable[None]], seconds: float) -> None:
        results[name] = await _check(name, check, seconds)

    async with anyio.create_task_group() as group:
        for name, (check, seconds) in checks.items():
            group.start_soon(run, name, check, seconds)
    status = "ok" if all(v == "ok" for v in results.values()) else "degraded"
    if status != "ok":
        # Load balancers and probes read the code, not the body.
        response.status_code = 503
    return {"status": status, **{name: results[name] for name in checks}}


@router.get("/health")
async def health(request: Request, response: Response) -> dict[str, Any]:
    """Database, broker and a worker round trip (503 if any fails)."""
    return await _run_checks(
        response,
        {
            "database": (_database_check(request), DATABASE_TIMEOUT),
            "broker": (_broker, BROKER_TIMEOUT),
            "worker": (_worker, WORKER_TIMEOUT + 1),
        },
    )


@router.get("/ready")
async def ready(request: Request, response: Response) -> dict[str, Any]:
    """Readiness: the database and the broker answer (503 if not); no worker needed."""
    return await _run_checks(
        response,
        {
            "database": (_database_check(request), DATABASE_TIMEOUT),
            "broker": (_broker, BROKER_TIMEOUT),
        },
    )
