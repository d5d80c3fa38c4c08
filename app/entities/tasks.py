"""Example db tasks: process one entity, or all of them in batches."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from app.core.background import TaskContext, db_task
from app.entities.crud import entity_crud

__all__ = ("process_entity",)


@db_task(name="entities.process_entity", retry_policy="standard")
async def process_entity(ctx: TaskContext, entity_id: str) -> dict[str, Any]:
    entity_uuid = ctx.validate_uuid(entity_id, "entity_id")
    entity = await entity_crud.get(ctx.session, entity_uuid)
    if entity is None:
        raise ctx.not_found_error("Entity not found", entity_id=entity_id)
    entity.status = "processed"
    entity.processed_count += 1
    entity.processed_at = datetime.now(UTC)
    ctx.log_success("Entity processed", entity_id=entity_id)
    # Auto-commits on success.
    return ctx.success_result(entity_id=entity_id)
