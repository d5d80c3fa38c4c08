"""The asyncio pool's result writes, made from its event loop: one pipeline per batch.

Every run on the asyncio pool writes its state twice (``STARTED``, then the
outcome), each one call of the result backend's script
(``result_backend.py``). Made with Celery's blocking client they would hold
the loop, and every run on it, for a round trip each. They used to go to a
thread that sent the writes waiting at that moment in one pipeline; each
write then crossed from the loop's thread to the writer's and back, each side
woken and waiting for the GIL behind the worker's main thread.

Here the writes are made on the loop with redis-py's asyncio client: a run's
write waits for Redis as any other await does, the writes queued while a
pipeline is out go together in the next one, and no thread takes part.
Measured with ``SELECT pg_sleep(0.05)`` in ``@db_task`` runs, two processes x
100 (``python -m bench --only io_db``, three alternating rounds): 572 -> 679
tasks/s (median), worker CPU 2,540 -> 2,300 µs per task; ``await
asyncio.sleep(0.1)`` runs drained as before.

A write the pipeline could not make (Redis lost the script after a restart,
or the connection) is made again alone in a thread through Celery's own
reconnecting client (the write's ``__call__``): the script is safe to run
twice.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import redis
import redis.asyncio

from ..event_loop import held_until_done


class ScriptWrite(Protocol):
    """One call of the backend's script: its input, and how to make it alone (blocking)."""

    def script_input(self) -> tuple[list[Any], list[Any]]: ...

    def __call__(self) -> Any: ...


# The asyncio connection class for the one Celery's settings chose (plain TCP otherwise).
_ASYNC_CONNECTIONS: dict[type[Any], type[redis.asyncio.connection.AbstractConnection]] = {
    redis.SSLConnection: redis.asyncio.SSLConnection,
    redis.UnixDomainSocketConnection: redis.asyncio.UnixDomainSocketConnection,
}
# A pipelined write that got no reply.
_UNSENT = object()
# The writers of this process, closed with their loop (``close_on_this_loop``).
_open: weakref.WeakSet[LoopWrites] = weakref.WeakSet()


def async_client(connparams: dict[str, Any]) -> redis.asyncio.Redis:
    """An asyncio client with the connection settings of Celery's blocking one."""
    params = dict(connparams)
    sync_class = params.pop("connection_class", None)
    params["connection_class"] = _ASYNC_CONNECTIONS.get(sync_class, redis.asyncio.Connection)
    return redis.asyncio.Redis.from_pool(redis.asyncio.ConnectionPool(**params))


class LoopWrites:
    """The script writes of one loop's runs, sent from that loop a pipeline at a time."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, client: redis.asyncio.Redis, sha: Callable[[], str]
    ) -> None:
        self.loop = loop
        self._client = client
        # The script's SHA1 (the blocking client's registered script has it).
        self._sha = sha
        self._queued: list[tuple[ScriptWrite, asyncio.Future[Any]]] = []
        self._sending: asyncio.Task[None] | None = None
        _open.add(self)

    async def write(self, write: ScriptWrite) -> Any:
        """The script's reply to ``write``; a cancellation waits for it (``held_until_done``)."""
        reply: asyncio.Future[Any] = self.loop.create_future()
        self._queued.append((write, reply))
        if self._sending is None:
            # A context of its own: not the first writer's (its log fields, its deadline).
            self._sending = self.loop.create_task(
                self._send_queued(), context=contextvars.Context()
            )
        return await held_until_done(reply)

    async def _send_queued(self) -> None:
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                outcomes = await self.send([write for write, _ in batch])
                for (_, reply), outcome in zip(batch, outcomes, strict=True):
                    if reply.done():
                        continue
                    if isinstance(outcome, BaseException):
                        reply.set_exception(outcome)
                    else:
                        reply.set_result(outcome)
        finally:
            self._sending = None

    async def send(self, writes: list[ScriptWrite]) -> list[Any]:
        """Make ``writes`` in one pipeline: one outcome each (the reply, or the error)."""
        sha = self._sha()
        pipeline = self._client.pipeline(transaction=False)
        for write in writes:
            keys, args = write.script_input()
            pipeline.evalsha(sha, len(keys), *keys, *args)
        try:
            replies: list[Any] = await pipeline.execute(raise_on_error=False)
        except Exception:  # noqa: BLE001 - each write is made again alone below
            replies = [_UNSENT] * len(writes)
        made = zip(writes, replies, strict=True)
        return list(await asyncio.gather(*(_alone_unless_made(w, r) for w, r in made)))

    async def aclose(self) -> None:
        _open.discard(self)
        await self._client.aclose()


async def _alone_unless_made(write: ScriptWrite, reply: Any) -> Any:
    if reply is not _UNSENT and not isinstance(reply, Exception):
        return reply
    try:
        return await asyncio.to_thread(write)
    except Exception as exc:  # noqa: BLE001 - raised in the run that wrote
        return exc


async def close_on_this_loop() -> None:
    """Close the writers of the running loop (the worker's shutdown, before the loop stops)."""
    loop = asyncio.get_running_loop()
    for writes in [writes for writes in _open if writes.loop is loop]:
        await writes.aclose()
