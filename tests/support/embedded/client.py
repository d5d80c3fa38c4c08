"""A producer on the embedded default, run as its own process by the embedded tests.

Creates the tables, inserts an entity, dispatches the example tasks through the
file broker and prints what came back as one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from app.core.config import get_settings
from app.core.engine import create_tables, engine_from_settings
from app.entities.crud import entity_crud
from app.entities.tasks import process_entity
from app.notifications.tasks import send_notification


async def prepare() -> str:
    engine = engine_from_settings(get_settings())
    await create_tables(engine)
    from sqlalchemy.ext.asyncio import AsyncSession

    async with AsyncSession(engine) as session:
        entity = await entity_crud.create(session, "embedded")
        entity_id = str(entity.id)
        await session.commit()
    await engine.dispose()
    return entity_id


def main() -> None:
    entity_id = asyncio.run(prepare())
    report: dict[str, object] = {"entity_id": entity_id}
    report["processed"] = process_entity.delay(entity_id=entity_id).get(timeout=30)
    missing = process_entity.delay(entity_id=str(uuid.uuid4()))
    report["missing_id"] = missing.id
    try:
        missing.get(timeout=30)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        report["missing_error"] = f"{type(exc).__name__}: {exc}"
    report["notified"] = send_notification.delay(user_id=str(uuid.uuid4()), message="hello").get(
        timeout=30
    )
    started = time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        # Poll the SQLite result backend often: its default interval is 0.5 s.
        send_notification.delay(user_id=str(uuid.uuid4()), message="x").get(
            timeout=30, interval=0.01
        )
    report["round_trip_ms"] = round((time.perf_counter() - started) / rounds * 1000, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
