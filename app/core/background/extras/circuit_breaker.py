"""A circuit breaker for calls to an external service.

``CircuitBreaker(name="email_service", failure_threshold=5)`` lets calls
through while the service works (*closed*), fails them at once with
``CircuitBreakerOpen`` for ``recovery_timeout`` seconds after
``failure_threshold`` consecutive failures (*open*), then lets one probe call
through (*half-open*): its success closes the breaker, its failure opens it
again for another ``recovery_timeout``.

State lives in this process by default. Pass ``redis=`` (a ``redis.Redis``
client) to keep it in Redis instead, so that every process of every worker
host sees one breaker: one host's failures open it for all, and only one
caller anywhere probes the service when it is half-open.

Why not pybreaker (it has a Redis storage): its ``call`` holds one lock
across the guarded call, so threads calling the same service are serialised;
its async support needs Tornado; its Redis storage updates state with
separate reads and writes (two processes can both trip or both reset it) and
keeps ``opened_at`` in whole seconds; and half-open lets every caller through
instead of one probe. Each of these matters for a breaker shared by many
worker processes, so the state machine is here, and the Redis variant is one
Lua script that Redis runs atomically, on Redis's own clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

from ..internals.exceptions import TaskError
from ..internals.monitoring import breaker_state_changed

P = ParamSpec("P")
R = TypeVar("R")

State = Literal["closed", "open", "half_open"]


class CircuitBreakerOpen(TaskError):
    """The circuit breaker is open: the service is not called for now.

    Retriable: a task that lets it propagate is retried, and not sooner than
    ``retry_after`` seconds (when the breaker lets a probe through).
    """

    def __init__(self, message: str | None = None, retry_after: float = 0.0, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Admission:
    """What the storage decided for one call."""

    allowed: bool
    probe: bool
    state: State
    retry_after: float


class BreakerStorage(Protocol):
    """Where a breaker's state lives; every method is one atomic step."""

    def admit(self, recovery_timeout: float) -> Admission: ...

    def record(
        self, success: bool, probe: bool, failure_threshold: int, recovery_timeout: float
    ) -> State: ...

    def state(self, recovery_timeout: float) -> State: ...

    def reset(self) -> None: ...


class MemoryStorage:
    """State in this process, guarded by a lock (never held during the call)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_until = 0.0

    def admit(self, recovery_timeout: float) -> Admission:
        with self._lock:
            now = self._clock()
            if self._state == "closed":
                return Admission(True, False, "closed", 0.0)
            if self._state == "open":
                reopen_at = self._opened_at + recovery_timeout
                if now < reopen_at:
                    return Admission(False, False, "open", reopen_at - now)
                self._state = "half_open"
            # Half-open: one probe at a time. A probe that never reports back
            # (its process died) frees the slot after another recovery_timeout.
            if now < self._probe_until:
                return Admission(False, False, "half_open", self._probe_until - now)
            self._probe_until = now + recovery_timeout
            return Admission(True, True, "half_open", 0.0)

    def record(
        self, success: bool, probe: bool, failure_threshold: int, recovery_timeout: float
    ) -> State:
        with self._lock:
            if probe:
                self._probe_until = 0.0
                if success:
                    self._state, self._failures = "closed", 0
                else:
                    self._state, self._opened_at = "open", self._clock()
            elif self._state == "closed":
                # Outcomes of calls admitted while closed but finishing after the
                # breaker opened are ignored: the probe decides.
                if success:
                    self._failures = 0
                else:
                    self._failures += 1
                    if self._failures >= failure_threshold:
                        self._state, self._opened_at = "open", self._clock()
            return self._state

    def state(self, recovery_timeout: float) -> State:
        with self._lock:
            if self._state == "open" and self._clock() >= self._opened_at + recovery_timeout:
                return "half_open"
            return self._state

    def reset(self) -> None:
        with self._lock:
            self._state, self._failures, self._opened_at, self._probe_until = "closed", 0, 0.0, 0.0


# One script for every step, run atomically by Redis with Redis's clock (so
# hosts with skewed clocks agree). KEYS[1]: the breaker's hash. ARGV: op,
# recovery_timeout (s), failure_threshold, success (0/1), probe (0/1).
# Returns {state, allowed, probe, retry_after in ms}.
_REDIS_SCRIPT = """
local key = KEYS[1]
local op = ARGV[1]
local timeout_ms = math.floor(tonumber(ARGV[2]) * 1000)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', key, 'state', 'failures', 'opened_at', 'probe_until')
local state = h[1] or 'closed'
local failures = tonumber(h[2] or '0')
local opened_at = tonumber(h[3] or '0')
local probe_until = tonumber(h[4] or '0')
if op == 'reset' then
  redis.call('DEL', key)
  return {'closed', 0, 0, 0}
end
if op == 'state' then
  if state == 'open' and now >= opened_at + timeout_ms then return {'half_open', 0, 0, 0} end
  return {state, 0, 0, 0}
end
if op == 'admit' then
  if state == 'closed' then return {'closed', 1, 0, 0} end
  if state == 'open' then
    if now < opened_at + timeout_ms then return {'open', 0, 0, opened_at + timeout_ms - now} end
    state = 'half_open'
    redis.call('HSET', key, 'state', state)
  end
  if now < probe_until then return {'half_open', 0, 0, probe_until - now} end
  redis.call('HSET', key, 'probe_until', now + timeout_ms)
  return {'half_open', 1, 1, 0}
end
-- op == 'record'
local success = ARGV[4] == '1'
local probe = ARGV[5] == '1'
local threshold = tonumber(ARGV[3])
if probe then
  if success then
    redis.call('HSET', key, 'state', 'closed', 'failures', 0, 'probe_until', 0)
    state = 'closed'
  else
    redis.call('HSET', key, 'state', 'open', 'opened_at', now, 'probe_until', 0)
    state = 'open'
  end
elseif state == 'closed' then
  if success then
    if failures > 0 then redis.call('HSET', key, 'failures', 0) end
  else
    failures = redis.call('HINCRBY', key, 'failures', 1)
    if failures >= threshold then
      redis.call('HSET', key, 'state', 'open', 'opened_at', now)
      state = 'open'
    end
  end
end
return {state, 0, 0, 0}
"""


class RedisStorage:
    """State in one Redis hash, shared by every process that uses the same key."""

    def __init__(self, client: Any, key: str) -> None:
        self._key = key
        self._script = client.register_script(_REDIS_SCRIPT)

    def _run(self, *args: Any) -> list[Any]:
        reply: list[Any] = self._script(keys=[self._key], args=list(args))
        state = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        return [state, *reply[1:]]

    def admit(self, recovery_timeout: float) -> Admission:
        state, allowed, probe, retry_after_ms = self._run("admit", recovery_timeout)
        return Admission(bool(allowed), bool(probe), state, int(retry_after_ms) / 1000)

    def record(
        self, success: bool, probe: bool, failure_threshold: int, recovery_timeout: float
    ) -> State:
        state: State = self._run(
            "record", recovery_timeout, failure_threshold, int(success), int(probe)
        )[0]
        return state

    def state(self, recovery_timeout: float) -> State:
        state: State = self._run("state", recovery_timeout)[0]
        return state

    def reset(self) -> None:
        self._run("reset", 0)


class CircuitBreaker:
    """Stops calling a failing service for a while, then probes it.

    ``failure_exceptions``: the exception types that count as a failure of the
    service (default: every ``Exception``); ``exclude``: types that never count
    (a 404 or a validation error says nothing about the service's health).
    An excluded exception passes through and counts as a success.
    """

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        recovery_timeout: float = 30.0,
        *,
        failure_exceptions: tuple[type[BaseException], ...] = (Exception,),
        exclude: tuple[type[BaseException], ...] = (),
        redis: Any = None,
        redis_key_prefix: str = "background:circuit_breaker",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if recovery_timeout <= 0:
            raise ValueError("recovery_timeout must be positive")
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.failure_exceptions = failure_exceptions
        self.exclude = exclude
        self._storage: BreakerStorage = (
            RedisStorage(redis, f"{redis_key_prefix}:{name}")
            if redis is not None
            else MemoryStorage(clock)
        )
        self._last_state: State | None = None

    @property
    def shared(self) -> bool:
        return isinstance(self._storage, RedisStorage)

    @property
    def state(self) -> State:
        """``closed``, ``open`` or ``half_open`` (open past its recovery timeout)."""
        state = self._storage.state(self.recovery_timeout)
        self._publish(state)
        return state

    def reset(self) -> None:
        """Close the breaker and forget past failures."""
        self._storage.reset()
        self._publish("closed")

    def counts_as_failure(self, exc: BaseException) -> bool:
        return isinstance(exc, self.failure_exceptions) and not isinstance(exc, self.exclude)

    def call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``fn(*args, **kwargs)`` through the breaker; ``CircuitBreakerOpen`` while open."""
        probe = self._admit()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._record_exception(exc, probe)
            raise
        self._record(True, probe)
        return result

    async def call_async(
        self, fn: Callable[P, Awaitable[R]], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """``await fn(*args, **kwargs)`` through the breaker (for coroutine functions)."""
        probe = self._admit()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self._record_exception(exc, probe)
            raise
        self._record(True, probe)
        return result

    # The spec's wording ("an async call"): both names work.
    acall = call_async

    def _admit(self) -> bool:
        admission = self._storage.admit(self.recovery_timeout)
        self._publish(admission.state)
        if not admission.allowed:
            raise CircuitBreakerOpen(
                f"circuit breaker {self.name!r} is {admission.state.replace('_', '-')}",
                retry_after=max(admission.retry_after, 0.001),
                breaker=self.name,
            )
        return admission.probe

    def _record_exception(self, exc: BaseException, probe: bool) -> None:
        if isinstance(exc, Exception):
            self._record(not self.counts_as_failure(exc), probe)
        elif probe:
            # Cancelled or interrupted: no verdict on the service, but the probe
            # slot must be freed; re-open rather than close on no evidence.
            self._record(False, probe)

    def _record(self, success: bool, probe: bool) -> None:
        state = self._storage.record(success, probe, self.failure_threshold, self.recovery_timeout)
        self._publish(state)

    def _publish(self, state: State) -> None:
        if state != self._last_state:
            self._last_state = state
            breaker_state_changed(self.name, state)

    def __repr__(self) -> str:
        where = "redis" if self.shared else "process"
        return f"CircuitBreaker({self.name!r}, threshold={self.failure_threshold}, {where})"
