from __future__ import annotations

import uuid
from typing import Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel

from app.api.deps import SessionDep, TaskSessionDep
from app.entities.crud import entity_crud
from app.entities.tasks import bulk_mark_processed, process_entity

router = APIRouter(prefix="/entities", tags=["entities"])


class EntityIn(BaseModel):
    name: str


class EntityOut(BaseModel):
    id: uuid.UUID
    name: str
    status: str
    processed_count: int


class Dispatched(BaseModel):
    task_id: str


class EntityCreated(EntityOut):
    task_id: str


@router.post("", response_model=EntityCreated, status_code=201)
async def create_entity(
    body: EntityIn,
    session: TaskSessionDep,
    delivery: Literal["after_commit", "outbox"] = "after_commit",
) -> EntityCreated:
    """Create an entity and process it once the row is committed (never if it is not).

    ``after_commit``: sent by ``session.commit()`` (in a thread, the loop stays free).
    ``outbox``: written in this transaction, sent by the relay even if this process dies.
    """
    entity = await entity_crud.create(session, body.name)
    if delivery == "outbox":
        task = process_entity.delay_via_outbox(session, entity_id=str(entity.id))
    else:
        task = process_entity.delay_on_commit(session, entity_id=str(entity.id))
    await session.commit()
    out = EntityOut.model_validate(entity, from_attributes=True)
    return EntityCreated(**out.model_dump(), task_id=task.id)


@router.post("/bulk-process", response_model=Dispatched, status_code=202)
def bulk_process(batch_size: int = Query(500, ge=1, le=10_000)) -> Dispatched:
    """Mark every entity not processed yet, in the background.

    Follow it with ``GET /tasks/{task_id}`` (``progress``) or
    ``python -m app.core.background watch TASK_ID``.
    """
    result = bulk_mark_processed.delay(batch_size=batch_size)
    return Dispatched(task_id=result.id)


@router.get("/{entity_id}", response_model=EntityOut)
async def get_entity(entity_id: uuid.UUID, session: SessionDep) -> EntityOut:
    entity = await entity_crud.get(session, entity_id)
    if entity is None:
        raise HTTPException(status_code=404, detail="entity not found")
    return EntityOut.model_validate(entity, from_attributes=True)


@router.post("/{entity_id}/process", response_model=Dispatched, status_code=202)
def process(entity_id: uuid.UUID) -> Dispatched:
    # A plain ``def``: sending to the broker blocks, so FastAPI runs it in a thread.
    result = process_entity.delay(entity_id=str(entity_id))
    return Dispatched(task_id=result.id)
