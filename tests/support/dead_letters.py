"""Reading the dead letters a worker wrote, from the test process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.core.background.internals.operations.dead_letters import DeadLetter, DeadLetterStore
from tests.support.services import Services

T = TypeVar("T")

# The worker records a final failure just after it stores the result.
WAIT = 60.0


def run(make: Callable[[AsyncEngine], Awaitable[T]], stack: Services) -> T:
    """``make(engine)`` on a fresh engine of the test database (each call its own loop)."""

    async def go() -> T:
        engine = create_async_engine(stack.postgres_url)
        try:
            return await make(engine)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def letter_of(stack: Services, task_id: str, timeout: float = WAIT) -> DeadLetter:
    """The dead letter of ``task_id``, once the worker has written it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = run(lambda engine: DeadLetterStore(engine).get(task_id), stack)
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no dead letter for {task_id} after {timeout}s")
