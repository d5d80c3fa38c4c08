"""Batch iteration for bulk db tasks.

A CRUD object needs ``get(session, id) -> entity | None`` (the specification's
interface): each id is then loaded with its own query. If it also has
``get_many(session, ids) -> Sequence[entity]``, a whole batch is loaded with
one query. Entities are matched back to ids through their ``id`` attribute,
so ids with no entity are counted as ``missing`` instead of vanishing.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from sqlalchemy.ext.asyncio import AsyncSession

from .exceptions import TaskConfigurationError, TaskValidationError
from .monitoring import StatsCounter

ItemT = TypeVar("ItemT")

# The counter name under which ids without an entity are counted.
MISSING = "missing"


@runtime_checkable
class Crud(Protocol):
    """What ``iter_batches`` needs from a CRUD object."""

    async def get(self, session: AsyncSession, id: Any) -> Any: ...


@runtime_checkable
class BulkCrud(Crud, Protocol):
    """A CRUD object that can load many entities in one query."""

    async def get_many(self, session: AsyncSession, ids: Sequence[Any]) -> Sequence[Any]: ...


def check_batch_args(items: object, crud: object, batch_size: object) -> None:
    """Refuse arguments that cannot work, before the first batch is read."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TaskValidationError(
            "batch_size must be an integer of at least 1", batch_size=batch_size
        )
    if isinstance(items, str | bytes):
        # A single id passed where a collection was expected: iterating it
        # would yield characters.
        raise TaskValidationError("items must be an iterable of ids, not a string", items=items)
    if not isinstance(items, Iterable | AsyncIterable):
        raise TaskValidationError(
            "items must be an iterable or async iterable of ids", items_type=type(items).__name__
        )
    if crud is not None and not isinstance(crud, Crud):
        raise TaskConfigurationError(
            "crud must have an async get(session, id) method", crud_type=type(crud).__name__
        )


async def chunks(
    items: Iterable[ItemT] | AsyncIterable[ItemT], batch_size: int
) -> AsyncIterator[list[ItemT]]:
    """Lists of up to ``batch_size`` items from a sync or async iterable."""
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
    session: AsyncSession, crud: Crud, ids: Sequence[Any], stats: StatsCounter, bulk: bool
) -> list[Any]:
    """The entities for ``ids``, in id order, counting the ones that do not exist."""
    if bulk:
        found = await crud.get_many(session, ids)  # type: ignore[attr-defined]
        by_id = {getattr(entity, "id", None): entity for entity in found}
        entities = [by_id[i] for i in ids if i in by_id]
        if len(entities) < len(ids) and len(by_id.keys() & set(ids)) < len(by_id):
            # Entities were found that no id matched: ids of another type than
            # the model's (strings from a JSON message, UUIDs on the model).
            by_key = {_key(key): entity for key, entity in by_id.items()}
            entities = [by_key[key] for key in map(_key, ids) if key in by_key]
    else:
        entities = []
        for entity_id in ids:
            entity = await crud.get(session, entity_id)
            if entity is not None:
                entities.append(entity)
    missing = len(ids) - len(entities)
    if missing:
        stats.increment(MISSING, missing)
    return entities


def _key(value: Any) -> str:
    # Ids arrive as strings from JSON messages but may be UUIDs or ints on the model.
    return str(value)
