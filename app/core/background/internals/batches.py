"""Batch iteration for bulk db tasks.

A CRUD object needs ``get(session, id)``; if it also has
``get_many(session, ids) -> Sequence[entity]`` the batch is loaded with one
query. Entities are matched back to ids through their ``id`` attribute, so ids
with no entity are counted as ``missing`` instead of vanishing.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from sqlalchemy.ext.asyncio import AsyncSession

from .exceptions import TaskValidationError
from .monitoring import StatsCounter

ItemT = TypeVar("ItemT")


@runtime_checkable
class Crud(Protocol):
    """What ``iter_batches`` needs from a CRUD object."""

    async def get(self, session: AsyncSession, id: Any) -> Any: ...


@runtime_checkable
class BulkCrud(Crud, Protocol):
    """A CRUD object that can load many entities in one query."""

    async def get_many(self, session: AsyncSession, ids: Sequence[Any]) -> Sequence[Any]: ...


async def chunks(
    items: Iterable[ItemT] | AsyncIterable[ItemT], batch_size: int
) -> AsyncIterator[list[ItemT]]:
    """Lists of up to ``batch_size`` items from a sync or async iterable."""
    if batch_size < 1:
        raise TaskValidationError("batch_size must be at least 1", batch_size=batch_size)
    batch: list[ItemT] = []
    if isinstance(items, AsyncIterable):
        async for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
    else:
        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


async def load_batch(
    session: AsyncSession, crud: Crud, ids: Sequence[Any], stats: StatsCounter
) -> list[Any]:
    """The entities for ``ids``, in id order, counting the ones that do not exist."""
    if isinstance(crud, BulkCrud):
        found = await crud.get_many(session, ids)
        by_id = {_key(getattr(entity, "id", None)): entity for entity in found}
        entities = [by_id[key] for key in map(_key, ids) if key in by_id]
    else:
        entities = []
        for entity_id in ids:
            entity = await crud.get(session, entity_id)
            if entity is not None:
                entities.append(entity)
    missing = len(ids) - len(entities)
    if missing:
        stats.increment("missing", missing)
    return entities


def _key(value: Any) -> str:
    # Ids arrive as strings from JSON messages but may be UUIDs or ints on the model.
    return str(value)
