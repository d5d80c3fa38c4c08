"""Data access for entities: the CRUD interface the batch helpers understand."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.entities.models import Entity


def _as_uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


class EntityCrud:
    async def get(self, session: AsyncSession, id: Any) -> Entity | None:
        return await session.get(Entity, _as_uuid(id))

    async def get_many(self, session: AsyncSession, ids: Sequence[Any]) -> Sequence[Entity]:
        """One query for a whole batch (used by ``ctx.iter_batches``)."""
        result = await session.scalars(
            select(Entity).where(Entity.id.in_([_as_uuid(i) for i in ids]))
        )
        return result.all()

    async def create(self, session: AsyncSession, name: str) -> Entity:
        entity = Entity(name=name)
        session.add(entity)
        await session.flush()
        return entity


entity_crud = EntityCrud()
