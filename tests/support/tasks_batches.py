"""Tasks for tests/integration/test_batches.py (loaded by the session worker)."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from functools import cache
from typing import Any

import redis

from app.core.background import TaskContext, db_task
from app.entities.crud import entity_crud
from app.entities.models import PROCESSED


@cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])


async def _mark_in_batches(
    ctx: TaskContext, entity_ids: list[str], batch_size: int, fail_at: int | None
) -> dict[str, Any]:
    """The example's loop, failing in batch ``fail_at`` (0-based) after changing it."""
    stats = ctx.create_stats_counter()
    index = 0
    async for batch in ctx.iter_batches(entity_ids, entity_crud, batch_size=batch_size):
        for entity in batch:
            if entity.status == PROCESSED:
                stats.increment("skipped")
                continue
            entity.status = PROCESSED
            entity.processed_count += 1
            entity.processed_at = datetime.now(UTC)
            stats.increment("processed")
        if index == fail_at:
            await ctx.session.flush()  # the batch's updates reach the database...
            raise RuntimeError(f"batch {index} fails")  # ...and are rolled back
        await ctx.commit_batch()
        index += 1
    return ctx.success_result(**stats.to_dict())


@db_task(name="tests.batches.fail_in_batch", retry_policy="no_retry")
async def fail_in_batch(
    ctx: TaskContext, entity_ids: list[str], batch_size: int, fail_at: int
) -> dict[str, Any]:
    return await _mark_in_batches(ctx, entity_ids, batch_size, fail_at)


@db_task(name="tests.batches.fail_once_in_batch", retry_policy="aggressive")
async def fail_once_in_batch(
    ctx: TaskContext, entity_ids: list[str], batch_size: int, fail_at: int
) -> dict[str, Any]:
    result = await _mark_in_batches(
        ctx, entity_ids, batch_size, fail_at if ctx.attempt == 0 else None
    )
    return {**result, "attempt": ctx.attempt}


@db_task(name="tests.batches.progress_until_released", retry_policy="no_retry")
async def progress_until_released(
    ctx: TaskContext, entity_ids: list[str], batch_size: int, key: str
) -> dict[str, Any]:
    """Publishes progress after each batch; after the first, waits for ``release:{key}``."""
    stats = ctx.create_stats_counter()
    total = len(entity_ids)
    async for batch in ctx.iter_batches(entity_ids, entity_crud, batch_size=batch_size):
        stats.increment("processed", len(batch))
        await ctx.commit_batch()
        ctx.log_progress(done=stats.get("processed"), total=total, **stats.to_dict())
        for _ in range(1200):
            if _redis().exists(f"release:{key}"):
                break
            await asyncio.sleep(0.05)
        else:
            raise TimeoutError("never released")
    return ctx.success_result(**stats.to_dict())
