"""Celery's Redis result backend, with each state write made one atomic round trip.

Celery's key-value backends never overwrite a ``SUCCESS`` (a lost worker's late
``STARTED`` or ``RETRY`` must not hide a result), but they check it with a
``GET`` and then write with ``MULTI``/``SET``/``PUBLISH``/``EXEC``: two round
trips per state, three states per task (``STARTED``, ``SUCCESS``, and
``PROGRESS`` or ``RETRY`` when they happen), and a window between the read and
the write in which the rule can still be broken. Here the check, the write and
the publish are one Lua script: half the round trips of every task's result
traffic, and the rule holds under any interleaving. On the asyncio pool,
where one process runs up to a hundred tasks at once, the writes are made
from its loop, those waiting at the same moment in one pipeline
(``loop_writes.py``).

Everything else (keys, encoding, expiry, pub/sub for ``AsyncResult.get()``,
connection retries, chords) is Celery's own ``RedisBackend``. The loader maps
the ``redis://`` and ``rediss://`` schemes of ``CELERY_RESULT_BACKEND`` to this
class (``discovery.TaskModuleLoader.override_backends``), so the setting keeps
Celery's format. No library offers this; the subclass is what Celery's backend
aliases are for.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from celery.utils.serialization import bytes_to_str

from ..event_loop import worker_loop
from .deadline import past_deadline
from .loop_writes import LoopWrites, async_client

# KEYS[1]: the task's key, KEYS[2]: its count of lost runs, KEYS[3]: the set of
# running tasks (``RUNNING_KEY``). ARGV[1]: the encoded meta, ARGV[2]: expiry
# in seconds (0: none), ARGV[3]: the state, ARGV[4]: now (epoch seconds).
# Returns 0 when a stored SUCCESS is kept, else 1 + the runs lost so far. The
# plain finds are cheap filters; cjson decides, so a result that merely
# contains a word is not mistaken for the state.
#
# A STARTED write over STARTED (or PROGRESS) means that an earlier delivery
# started and never ended: its process died before acknowledging the message
# (the broker delivered it again with the same attempt number). That is
# counted, for ``runner`` to bound by the retry policy. A STARTED value equal
# to the stored one (same process id and host) is not another run but this
# write sent again (a client's retry after a lost reply): not counted.
#
# STARTED adds the task's key to the running set (scored by its start), any
# state but PROGRESS takes it out: the operations page lists running and
# stuck tasks from it without scanning every result (``operations/running.py``).
_STORE_UNLESS_SUCCEEDED = """
local current = redis.call('GET', KEYS[1])
local ttl = tonumber(ARGV[2])
if current and string.find(current, 'SUCCESS', 1, true) then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
local lost = 0
if ARGV[3] == 'STARTED' then
  local running = current and current ~= ARGV[1] and (string.find(current, 'STARTED', 1, true)
    or string.find(current, 'PROGRESS', 1, true))
  if running then
    local ok, meta = pcall(cjson.decode, current)
    local status = ok and type(meta) == 'table' and meta['status']
    if status == 'STARTED' or status == 'PROGRESS' then
      lost = redis.call('INCR', KEYS[2])
      if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
    end
  end
  if lost == 0 then lost = tonumber(redis.call('GET', KEYS[2]) or '0') end
end
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
if ARGV[3] == 'STARTED' then
  redis.call('ZADD', KEYS[3], tonumber(ARGV[4]), KEYS[1])
elseif ARGV[3] ~= 'PROGRESS' then
  redis.call('ZREM', KEYS[3], KEYS[1])
end
return 1 + lost
"""

# The sorted set of the keys of running tasks, scored by start time (see the script).
RUNNING_KEY = "background:running"

# The runs of the current task that were lost before this one started: (task id, count).
# Set by the STARTED write (Celery's tracer, just before the task runs), read by
# ``runner``. A context variable: on the asyncio pool many runs share a thread.
lost_runs: ContextVar[tuple[str, int] | None] = ContextVar("background_lost_runs", default=None)


class AtomicRedisBackend(RedisBackend):
    """``RedisBackend`` whose state writes check, store and publish in one script."""

    # Set by Celery's backend classes; the type stubs do not declare them.
    expires: int | None
    connparams: dict[str, Any]
    failure_expires: int | None
    _get_result_meta: Callable[..., dict[str, Any]]
    _store_script: Any = None
    # The writes of the asyncio pool's runs, from its loop (made on first use).
    _writes: LoopWrites | None = None

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Do not subscribe to the result at publish time; ``AsyncResult.get()`` does.

        Celery's Redis backend SUBSCRIBEs to every task's result channel as it is
        sent, in case ``.get()`` follows: a round trip per ``.delay()``, and a
        channel held open per task in a web process that never asks. ``get()``
        subscribes by itself (``add_pending_result``) and then reads the stored
        result once (``on_wait_for_pending``), so a result stored before the
        subscription is not missed.
        """

    def on_connection_error(self, max_retries: Any, exc: Any, intervals: Any, retries: Any) -> Any:
        # Celery reconnects 20 times over 19 s; a dispatch (the SENT record, a
        # result written by a worker) gives up at its deadline instead (``delivery/publish.py``).
        if past_deadline():
            raise exc
        return super().on_connection_error(max_retries, exc, intervals, retries)

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        expires = self.failure_expires if state == states.FAILURE else self.expires
        args = (self.get_key_for_task(task_id), value, expires, state)
        inline = worker_loop.inline_runner()
        if inline is None:
            written = self.ensure(self._run_store, args)
        else:
            # One of the asyncio pool's runs: written from its loop (loop_writes.py).
            written = inline(self._loop_writes().write(_Store(self, args)))
        if state == states.STARTED:
            lost_runs.set((meta["task_id"], max(int(written or 0) - 1, 0)))
        return result

    def store_unless_succeeded(self, task_id: str, meta: dict[str, Any]) -> bool:
        """Write ``meta`` as it is unless the task already succeeded (True if written)."""
        key, value = self.get_key_for_task(task_id), self.encode(meta)
        state = str(meta.get("status") or "")
        return bool(self.ensure(self._run_store, (key, value, self.expires, state)))

    def _run_store(self, key: str, value: Any, expires: Any, state: str) -> Any:
        keys, args = _script_input(key, value, expires, state)
        return self._script()(keys=keys, args=args)

    def _loop_writes(self) -> LoopWrites:
        """The writer of the running loop (the asyncio pool's), made on first use."""
        loop = asyncio.get_running_loop()
        writes = self._writes
        if writes is None or writes.loop is not loop:
            writes = self._writes = LoopWrites(
                loop, async_client(self.connparams), lambda: str(self._script().sha)
            )
        return writes

    def _script(self) -> Any:
        if self._store_script is None:
            # register_script sends EVALSHA and falls back to EVAL after a
            # NOSCRIPT (a restarted or flushed Redis).
            self._store_script = self.client.register_script(_STORE_UNLESS_SUCCEEDED)
        return self._store_script


def _script_input(key: Any, value: Any, expires: Any, state: str) -> tuple[list[Any], list[Any]]:
    """The keys and arguments of ``_STORE_UNLESS_SUCCEEDED`` for one write."""
    ttl = int(expires.total_seconds() if hasattr(expires, "total_seconds") else expires or 0)
    keys = [key, f"{bytes_to_str(key)}:lost-runs", RUNNING_KEY]
    return keys, [value, max(ttl, 0), state, repr(time.time())]


class _Store:
    """One state write of an asyncio pool run: sent in a pipeline, or made alone (``store()``)."""

    __slots__ = ("args", "backend", "context")

    def __init__(self, backend: AtomicRedisBackend, args: tuple[Any, Any, Any, str]) -> None:
        self.backend, self.args = backend, args
        # The writing task's context variables (a dispatch deadline, for
        # ``on_connection_error``) hold when the write is made in another thread.
        self.context = contextvars.copy_context()

    def script_input(self) -> tuple[list[Any], list[Any]]:
        return _script_input(*self.args)

    def __call__(self) -> Any:
        return self.context.run(self.backend.ensure, self.backend._run_store, self.args)
