from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel

from app.core.database import SessionDep
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


@router.post("", response_model=EntityOut, status_code=201)
async def create_entity(body: EntityIn, session: SessionDep) -> EntityOut:
    entity = await entity_crud.create(session, body.name)
    await session.commit()
    return EntityOut.model_validate(entity, from_attributes=True)


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
