"""The operations router: JSON endpoints and one server-rendered page for the engineer on call.

The application mounts it behind a dependency of its own (there is no open
default: ``guard`` is required)::

    app.include_router(operations_router(guard=require_admin), prefix="/background")

JSON (under ``/api``): queue depths, running and stuck tasks, dead letters
(paged, filtered, grouped, one with its arguments and traceback), replay of
one / a group / a filtered set, purge, and cancelling a running task. HTML:
the overview page (``/``), one dead letter's page, and form actions that
redirect back to the page (no JavaScript, no build step). Every blocking
call (the broker, the result backend, Celery's publish) runs off the event
loop.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints'
# annotations at run time, and ``Store`` is local to operations_router.
import asyncio
import weakref
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from celery import Celery
from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from ..operations.cancel import NotCancellableError, revoke
from ..operations.dead_letters import PAGE_SIZE, DeadLetter, DeadLetterFilter, DeadLetterStore
from ..operations.running import queue_depths, running_tasks
from .page import render_dead_letter, render_overview
from .replay import ReplayOutcome, outcome_as_dict, replay, replay_where

EngineOf = Callable[[Request], AsyncEngine]

# The overview page's route name: links and redirects are made from its URL.
PAGE_ROUTE = "background_operations_page"

_REFUSAL_STATUS = {
    "not found": 404,
    "already replayed": 409,
    "deduplicated": 409,
    "not replayable": 422,
}


def engine_from_app_state(request: Request) -> AsyncEngine:
    """The application's engine, where the example app keeps it (``app.state.engine``)."""
    engine = getattr(request.app.state, "engine", None)
    if not isinstance(engine, AsyncEngine):
        raise RuntimeError(
            "operations_router needs the application's AsyncEngine: set app.state.engine "
            "or pass engine=<function of the request>"
        )
    return engine


_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def refuse_cross_site_changes(request: Request) -> None:
    """Refuse a replay, purge or cancel that another site's page made the browser send.

    A browser sends cached HTTP Basic credentials (and cookies) with a form
    another site submits: without this, any page an operator opens could
    replay or cancel tasks. Browsers say where a request comes from
    (``Sec-Fetch-Site``; ``Origin`` on a POST); a request that says neither
    (curl, an API client) is no browser's cross-site request.
    """
    if request.method not in _UNSAFE_METHODS:
        return
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        if site not in ("same-origin", "none"):
            raise HTTPException(403, f"refused: a cross-site request ({site})")
        return
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise HTTPException(403, f"refused: a request from another origin ({origin})")


class ReplayFilter(BaseModel):
    """Which dead letters to replay: a group (task and error), a time range, or both."""

    task_name: str | None = None
    error_type: str | None = None
    since: float | None = None
    until: float | None = None


def operations_router(
    *,
    guard: Callable[..., Any],
    app: Celery,
    engine: EngineOf = engine_from_app_state,
) -> APIRouter:
    """The operations endpoints and page, every one behind the application's ``guard``."""
    router = APIRouter(
        dependencies=[Depends(guard), Depends(refuse_cross_site_changes)], tags=["operations"]
    )

    # One store per engine: it creates the table once, not on every request.
    stores: weakref.WeakKeyDictionary[AsyncEngine, DeadLetterStore] = weakref.WeakKeyDictionary()

    def store(request: Request) -> DeadLetterStore:
        bound = engine(request)
        found = stores.get(bound)
        if found is None:
            found = stores[bound] = DeadLetterStore(bound)
        return found

    Store = Annotated[DeadLetterStore, Depends(store)]

    # -- JSON -----------------------------------------------------------------

    @router.get("/api/queues")
    async def queues() -> dict[str, int | None]:
        return await asyncio.to_thread(queue_depths, app)

    @router.get("/api/running")
    async def running() -> dict[str, Any]:
        found = await asyncio.to_thread(running_tasks, app)
        if found is None:
            return {"available": False, "reason": _NO_RUNNING_SET, "tasks": []}
        return {"available": True, "tasks": [task.as_dict() for task in found]}

    @router.get("/api/dead-letters")
    async def list_dead_letters(
        store: Store,
        task_name: str | None = None,
        error_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = PAGE_SIZE,
    ) -> dict[str, Any]:
        where = DeadLetterFilter(task_name, error_type, since, until)
        letters, total = await store.page(where, offset=offset, limit=limit)
        return {"total": total, "offset": offset, "items": [_summary(x) for x in letters]}

    @router.get("/api/dead-letters/groups")
    async def dead_letter_groups(store: Store) -> list[dict[str, Any]]:
        return [asdict(group) for group in await store.groups()]

    @router.get("/api/dead-letters/{task_id}")
    async def get_dead_letter(task_id: str, store: Store) -> dict[str, Any]:
        letter = await store.get(task_id)
        if letter is None:
            raise HTTPException(404, f"no dead letter {task_id!r}")
        return letter.as_dict()

    @router.post("/api/dead-letters/{task_id}/replay")
    async def replay_one(task_id: str, store: Store) -> dict[str, Any]:
        outcome = await replay(store, app, task_id)
        if not outcome.sent:
            raise HTTPException(_status_of(outcome), outcome_as_dict(outcome))
        return outcome_as_dict(outcome)

    @router.post("/api/dead-letters/replay")
    async def replay_many(chosen: ReplayFilter, store: Store) -> dict[str, Any]:
        if chosen == ReplayFilter():
            raise HTTPException(422, "give task_name, error_type, since or until")
        where = DeadLetterFilter(chosen.task_name, chosen.error_type, chosen.since, chosen.until)
        summary = await replay_where(store, app, where)
        return {
            "sent": summary.sent,
            "refused": [outcome_as_dict(outcome) for outcome in summary.refused],
        }

    @router.delete("/api/dead-letters/{task_id}", status_code=204)
    async def purge_one(task_id: str, store: Store) -> Response:
        if not await store.purge(DeadLetterFilter(), task_id=task_id):
            raise HTTPException(404, f"no dead letter {task_id!r}")
        return Response(status_code=204)

    @router.delete("/api/tasks/{task_id}")
    async def cancel(task_id: str) -> dict[str, Any]:
        try:
            state = await asyncio.to_thread(revoke, app, task_id)
        except NotCancellableError as exc:
            raise HTTPException(409, str(exc)) from None
        if state is None:
            raise HTTPException(404, f"unknown task {task_id!r}")
        return {"task_id": task_id, "state": state}

    # -- the page -------------------------------------------------------------

    @router.get("/", response_class=HTMLResponse, name=PAGE_ROUTE)
    async def overview(
        request: Request,
        store: Store,
        task_name: str | None = None,
        error_type: str | None = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        message: str | None = None,
    ) -> HTMLResponse:
        where = DeadLetterFilter(task_name=task_name, error_type=error_type)
        depths, found, groups, (letters, total) = await asyncio.gather(
            asyncio.to_thread(queue_depths, app),
            asyncio.to_thread(running_tasks, app),
            store.groups(),
            store.page(where, offset=offset, limit=PAGE_SIZE),
        )
        return HTMLResponse(
            render_overview(
                base=_base(request),
                queues=depths,
                running=found,
                no_running_reason=_NO_RUNNING_SET,
                groups=groups,
                letters=letters,
                total=total,
                offset=offset,
                page_size=PAGE_SIZE,
                where=where,
                message=message,
            )
        )

    @router.get("/dead-letters/{task_id}", response_class=HTMLResponse)
    async def dead_letter_page(
        request: Request, task_id: str, store: Store, message: str | None = None
    ) -> HTMLResponse:
        letter = await store.get(task_id)
        if letter is None:
            raise HTTPException(404, f"no dead letter {task_id!r}")
        return HTMLResponse(render_dead_letter(base=_base(request), letter=letter, message=message))

    @router.post("/dead-letters/{task_id}/replay")
    async def replay_from_page(request: Request, task_id: str, store: Store) -> Response:
        outcome = await replay(store, app, task_id)
        text = (
            f"Replayed {task_id} as {outcome.replayed_as}."
            if outcome.sent
            else f"Not replayed: {outcome.reason}."
        )
        return _back(request, f"/dead-letters/{task_id}", text)

    @router.post("/dead-letters/replay-group")
    async def replay_group_from_page(
        request: Request,
        store: Store,
        task_name: Annotated[str, Form()],
        error_type: Annotated[str, Form()],
    ) -> Response:
        summary = await replay_where(store, app, DeadLetterFilter(task_name, error_type))
        refused = len(summary.refused)
        text = f"Replayed {summary.sent} of {task_name} / {error_type}; {refused} not sent."
        return _back(request, "/", text)

    @router.post("/tasks/{task_id}/cancel")
    async def cancel_from_page(request: Request, task_id: str) -> Response:
        try:
            state = await asyncio.to_thread(revoke, app, task_id)
        except NotCancellableError as exc:
            return _back(request, "/", f"Not cancelled: {exc}.")
        text = f"Unknown task {task_id}." if state is None else f"Task {task_id}: {state}."
        return _back(request, "/", text)

    return router


_NO_RUNNING_SET = (
    "running tasks are listed from the Redis result backend; this application's result "
    "backend keeps no list of them"
)


def _summary(letter: DeadLetter) -> dict[str, Any]:
    fields = letter.as_dict()
    del fields["arguments"], fields["traceback"]
    return fields


def _status_of(outcome: ReplayOutcome) -> int:
    return _REFUSAL_STATUS.get(outcome.refused or "", 503)


def _base(request: Request) -> str:
    """The router's own prefix, as the application mounted it (``/background``)."""
    return str(request.url_for(PAGE_ROUTE).path).rstrip("/")


def _back(request: Request, path: str, message: str) -> RedirectResponse:
    # 303: the browser follows with a GET, so a reload does not replay again.
    return RedirectResponse(
        f"{_base(request)}{path}?{urlencode({'message': message})}", status_code=303
    )
