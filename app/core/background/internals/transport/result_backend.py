"""Celery's Redis result backend, with each state write made one atomic round trip.

Celery's key-value backends never overwrite a ``SUCCESS`` (a lost worker's late
``STARTED`` or ``RETRY`` must not hide a result), but they check it with a
``GET`` and then write with ``MULTI``/``SET``/``PUBLISH``/``EXEC``: two round
trips per state, three states per task (``STARTED``, ``SUCCESS``, and
``PROGRESS`` or ``RETRY`` when they happen), and a window between the read and
the write in which the rule can still be broken. Here the check, the write and
the publish are one Lua script: half the round trips of every task's result
traffic, and the rule holds under any interleaving.

Everything else (keys, encoding, expiry, pub/sub for ``AsyncResult.get()``,
connection retries, chords) is Celery's own ``RedisBackend``. The loader maps
the ``redis://`` and ``rediss://`` schemes of ``CELERY_RESULT_BACKEND`` to this
class (``discovery.TaskModuleLoader.override_backends``), so the setting keeps
Celery's format. No library offers this; the subclass is what Celery's backend
aliases are for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from celery.utils.serialization import bytes_to_str

from ..event_loop import worker_loop
from .deadline import past_deadline

# KEYS[1]: the task's key. ARGV[1]: the encoded meta, ARGV[2]: expiry in
# seconds (0: none). Returns 0 when a stored SUCCESS is kept, 1 when written.
# The plain find is a cheap filter; cjson decides, so a result that merely
# contains the word is not mistaken for the state.
_STORE_UNLESS_SUCCEEDED = """
local current = redis.call('GET', KEYS[1])
if current and string.find(current, 'SUCCESS', 1, true) then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class AtomicRedisBackend(RedisBackend):
    """``RedisBackend`` whose state writes check, store and publish in one script."""

    # Set by Celery's backend classes; the type stubs do not declare them.
    expires: int | None
    failure_expires: int | None
    _get_result_meta: Callable[..., dict[str, Any]]
    _store_script: Any = None

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
        store_args = (self.get_key_for_task(task_id), value, expires)
        worker_loop.run_blocking(lambda: self.ensure(self._run_store, store_args))
        return result

    def store_unless_succeeded(self, task_id: str, meta: dict[str, Any]) -> bool:
        """Write ``meta`` as it is unless the task already succeeded (True if written)."""
        key, value = self.get_key_for_task(task_id), self.encode(meta)
        return bool(self.ensure(self._run_store, (key, value, self.expires)))

    def _run_store(self, key: str, value: Any, expires: Any) -> Any:
        if self._store_script is None:
            # register_script sends EVALSHA and falls back to EVAL after a
            # NOSCRIPT (a restarted or flushed Redis).
            self._store_script = self.client.register_script(_STORE_UNLESS_SUCCEEDED)
        ttl = int(expires.total_seconds() if hasattr(expires, "total_seconds") else expires or 0)
        return self._store_script(keys=[key], args=[value, max(ttl, 0)])
