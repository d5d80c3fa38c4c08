"""Example db tasks: process one entity, or all of them in batches."""

from __future__ import annotations

from collections.abc import AsyncIterable, Iterable
from datetime import UTC, datetime
from typing import Any

from app.core.background import TaskContext, db_task
from app.entities.crud import entity_crud
from app.entities.models import PROCESSED

__all__ = ("bulk_mark_processed", "process_entity")

# Ids are read ahead in pages larger than a batch: one id query per ten
# batches instead of one per batch (measured in bench/bench_batches.py).
ID_PAGE_SIZE = 5000


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


@db_task(name="entities.bulk_mark_processed", retry_policy="long_running", queue="low_priority")
async def bulk_mark_processed(
    ctx: TaskContext, entity_ids: list[str] | None = None, batch_size: int = 500
) -> dict[str, Any]:
    """Mark entities processed, ``batch_size`` at a time, with progress.

    With no ``entity_ids``: every entity not processed yet, read page by page
    (a message with 200,000 ids would be megabytes).

    Idempotent, so a retry resumes where the failure happened: each batch is
    committed on its own, and an entity that already has the ``processed``
    marker is never touched again (the id query skips it, and so does the
    loop when ids are given). A failure in batch k rolls back batch k only.
    """
    stats = ctx.create_stats_counter()
    ids: Iterable[Any] | AsyncIterable[Any]
    if entity_ids is None:
        total = await entity_crud.count_not_processed(ctx.session)
        page_size = max(batch_size, ID_PAGE_SIZE)
        ids = entity_crud.iter_ids_not_processed(ctx.session, page_size=page_size)
    else:
        total, ids = len(entity_ids), entity_ids
    now = datetime.now(UTC)
    async for batch in ctx.iter_batches(ids, entity_crud, batch_size=batch_size):
        for entity in batch:
            if entity.status == PROCESSED:
                stats.increment("skipped")  # done by an earlier run or attempt
                continue
            entity.status = PROCESSED
            entity.processed_count += 1
            entity.processed_at = now
            stats.increment("processed")
        await ctx.commit_batch()
        counts = stats.to_dict()
        ctx.log_progress(done=sum(counts.values()), total=total, **counts)
    return ctx.success_result(total=total, **stats.to_dict())
