"""Where the limits' shared state lives: Redis (one Lua script per decision) or SQL tables.

Every worker on every host asks the same store, and each decision is one
atomic step, so no two workers can both take the last slot or token:

- a **concurrency slot** is a holder (the task id) with a lease. Expired
  leases are dropped before counting; the holder's own entry is kept (a
  delivery of the same task again, after its process died, takes its slot
  back at once). Running tasks renew their leases (``gate.SlotKeeper``), so
  a slot of a process that died is free again after at most one lease;
- a **rate limit** is GCRA (the generic cell rate algorithm, as in
  redis-cell and Stripe's limiters): one "theoretical arrival time" per
  scope; a start is allowed while it is at most ``(burst - 1) x interval``
  ahead of now, and moves it one interval on.

A refused start is told when to come back. The store keeps, per scope, the
time the last waiter was told (``line_end``): each new waiter comes back one
expected interval after it, so waiters return spread over time, about when
capacity is expected, instead of all retrying at once. A waiter that comes
back when told and is refused again (a run ended a little late) is not sent
to the back of that line, which would make it wait the whole line again: it
joins a second line of its own kind (``retry_end``), spaced the same way and
starting now, so it is next among the returners. For a rate the
interval is the rate's; for a cap, the expected run time over the cap: the
average of the scope's past runs, or the age of its oldest running holder
when that is longer (runs longer than the past ones, or a scope's first runs,
do not make waiters come back every 100 ms). No wait is longer than
``max_wait`` (a waiter beyond it simply asks again then).

A take can carry the return of a slot the same process gave back a moment
before (``GivenBack``, ``take_slot(..., release=...)``): a process that runs
one capped run after another then makes one call per run instead of two. The
slot goes back first, whatever the take's verdict, so the count the take
sees is right and a refused take still gives the old slot back; the same
scope's return and take are one atomic step.

Idle state goes away: Redis keys expire (a day after their last use), and
``prune`` deletes idle rows of the SQL store (``background.prune_limits``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from sqlalchemy import Column, Double, MetaData, String, Table, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ..event_loop import LoopThread
from ..logging import FRAMEWORK_LOGGER_NAME
from ..session import DatabaseConfig, create_engine, ensure_table
from .limits import RateLimit

_log = logging.getLogger(FRAMEWORK_LOGGER_NAME)

# Before the first run of a scope has ended, the run time its waiters are spread by.
DEFAULT_RUN_SECONDS = 0.1
# A scope's state is kept this long after its last use (then a waiter's spacing
# starts again from DEFAULT_RUN_SECONDS and the oldest holder's age).
IDLE_SECONDS = 86_400  # pragma: no mutate (a second more or less: the same day)
# A bound on one Redis call (the check, a release, a renewal).
_SOCKET_TIMEOUT = 10.0  # pragma: no mutate (a bound, not behaviour)
# How much of each new run time goes into the average (an exponential moving average).
_AVERAGE_WEIGHT = 0.2


# Frozen or not, slotted or not: the same behaviour. pragma: no mutate
@dataclass(frozen=True, slots=True)  # pragma: no mutate
class Verdict:
    """Whether the run may start; if not, in how many seconds to ask again."""

    admitted: bool
    wait: float = 0.0  # pragma: no mutate (an admitted verdict's wait is never read)


ADMITTED = Verdict(True)


# Frozen or not, slotted or not: the same behaviour. pragma: no mutate
@dataclass(frozen=True, slots=True)  # pragma: no mutate
class GivenBack:
    """A slot a run gave back, not yet returned to the store (``release_slot``'s arguments)."""

    scope: str
    holder: str
    duration: float | None


class AdmissionStore(Protocol):
    """``peek``: decide as for a take, but take nothing when admitted (a refusal
    still queues the waiter); the worker's consumer screens messages with it.

    ``combines_any_scope``: whether a take carries the return of another scope's
    slot at no extra cost (Redis: in the same round trip). False: only the same
    scope's is worth carrying (SQL: another scope's return is a transaction of
    its own, which would then be on the run's path).
    """

    combines_any_scope: bool

    def take_slot(
        self,
        scope: str,
        holder: str,
        limit: int,
        lease: float,
        max_wait: float,
        peek: bool = False,  # pragma: no mutate (a protocol's defaults never run)
        returning: bool = False,  # pragma: no mutate (a protocol's defaults never run)
        release: GivenBack | None = None,  # pragma: no mutate (a protocol's defaults never run)
    ) -> Verdict:
        """Hold one of ``limit`` slots of ``scope`` for ``lease`` seconds, if one is free
        (``returning``: the caller waited already, refused it joins the returners' line).

        ``release``: first give that slot back, as ``release_slot`` does, whatever
        the verdict; of the same scope, in the same atomic step as the take. A
        return of another scope that fails is logged and left to its lease (as
        the keeper's own returns); the take's verdict or error is the answer."""

    def release_slot(self, scope: str, holder: str, duration: float | None) -> None:
        """Give the slot back; ``duration`` (the run's time, None: it did not run) feeds
        the waiters' spacing."""

    def renew_slots(self, held: Sequence[tuple[str, str]], lease: float) -> None:
        """Extend the leases of these (scope, holder) slots to ``lease`` seconds from now."""

    def holders(self, scope: str) -> list[str]:
        """The holders of live slots of ``scope`` (for operators and tests)."""

    def take_token(
        self,
        scope: str,
        rate: RateLimit,
        max_wait: float,
        peek: bool = False,  # pragma: no mutate (a protocol's defaults never run)
        returning: bool = False,  # pragma: no mutate (a protocol's defaults never run)
    ) -> Verdict:
        """Take a start of ``scope``'s rate if its pace allows one now (``returning``: as
        for a slot)."""

    def prune(self) -> int:
        """Delete the state of scopes idle for a day; how many scopes went."""


# -- Redis ---------------------------------------------------------------

# Milliseconds from Redis's own clock: every host's workers share one time.
_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local function put(key, field, value)
  redis.call('HSET', key, field, string.format('%.3f', value))
end
"""

# A slot's return, for both scripts below (their KEYS): the holder out of the
# slots and the starts; a run's time (ms, negative: it did not run) moves the
# scope's average run time (``default_run`` ms before the first).
_RELEASE_FUNCTION = (
    """
local function release(holder, duration, default_run)
  redis.call('ZREM', KEYS[1], holder)
  redis.call('ZREM', KEYS[3], holder)
  if duration < 0 then return end
  local average = tonumber(redis.call('HGET', KEYS[2], 'average') or default_run)
  put(KEYS[2], 'average', average + (duration - average) * """
    + str(_AVERAGE_WEIGHT)
    + """)
  redis.call('PEXPIRE', KEYS[2], IDLE_MS)
end
"""
)

# KEYS[1]: the slots (sorted set: holder -> lease end), KEYS[2]: the scope's
# state (hash: line_end, average), KEYS[3]: the holders' starts (sorted set:
# holder -> start). ARGV: holder, limit, lease ms, max wait ms, default run ms,
# peek (1: take nothing), the line (line_end, or retry_end for a returning
# waiter); optionally a slot of this scope to give back first: its holder and
# its run's time in ms (as for a release). Returns 0 (admitted) or the wait in ms.
_TAKE_SLOT = (
    _NOW
    + _RELEASE_FUNCTION
    + """
if ARGV[8] then release(ARGV[8], tonumber(ARGV[9]), ARGV[5]) end
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('ZREM', KEYS[3], unpack(expired))
end
local lease = tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  if ARGV[6] == '1' then return 0 end
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease))
  redis.call('PEXPIRE', KEYS[3], math.ceil(lease))
  return 0
end
local run = tonumber(redis.call('HGET', KEYS[2], 'average') or ARGV[5])
local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if oldest[2] then run = math.max(run, now - tonumber(oldest[2])) end
local at = math.max(now, tonumber(redis.call('HGET', KEYS[2], ARGV[7]) or 0))
  + math.max(run / tonumber(ARGV[2]), 1)
if at - now > tonumber(ARGV[4]) then
  return math.ceil(tonumber(ARGV[4]))
end
put(KEYS[2], ARGV[7], at)
redis.call('PEXPIRE', KEYS[2], IDLE_MS)
return math.max(1, math.ceil(at - now))
"""
).replace("IDLE_MS", str(IDLE_SECONDS * 1000))  # pragma: no mutate (a day, give or take)

# KEYS as above; ARGV: holder, the run's time in ms (negative: it did not run),
# default run ms.
_RELEASE_SLOT = (
    _NOW
    + _RELEASE_FUNCTION
    + """
release(ARGV[1], tonumber(ARGV[2]), ARGV[3])
return 1
"""
).replace("IDLE_MS", str(IDLE_SECONDS * 1000))  # pragma: no mutate (a day, give or take)

# KEYS[1]: a scope's slots, KEYS[2]: their starts; ARGV[1]: lease ms,
# ARGV[2..]: holders of this process in that scope (one scope per call: its
# keys share a hash tag).
_RENEW = (
    _NOW
    + """
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], math.ceil(lease))
redis.call('PEXPIRE', KEYS[2], math.ceil(lease))
return 1
"""
)

# KEYS[1]: the scope's state (hash: tat, line_end, retry_end). ARGV: interval
# ms, burst, max wait ms, peek (1: take nothing), the line (as for a slot).
# Returns 0 (admitted) or the wait in ms.
_TAKE_TOKEN = (
    _NOW
    + """
local interval = tonumber(ARGV[1])
local tolerance = (tonumber(ARGV[2]) - 1) * interval
local tat = math.max(tonumber(redis.call('HGET', KEYS[1], 'tat') or 0), now)
if tat - now <= tolerance then
  if ARGV[4] == '1' then return 0 end
  put(KEYS[1], 'tat', tat + interval)
  redis.call('PEXPIRE', KEYS[1], math.ceil(tat + interval - now) + 60000)
  return 0
end
local line_end = tonumber(redis.call('HGET', KEYS[1], ARGV[5]) or 0)
local at = math.max(tat - tolerance, line_end + interval)
if at - now > tonumber(ARGV[3]) then
  return math.ceil(tonumber(ARGV[3]))
end
put(KEYS[1], ARGV[5], at)
redis.call('PEXPIRE', KEYS[1], math.ceil(at - now) + 60000)
return math.max(1, math.ceil(at - now))
"""
)


def _line(returning: bool) -> str:
    """The line a refused waiter joins: the returners' own, or the newcomers'."""
    # Two lines by name: swapped, the same. pragma: no mutate
    return "retry_end" if returning else "line_end"  # pragma: no mutate


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def _run_ms(duration: float | None) -> float:
    """A run's time for the scripts: milliseconds, or negative when it did not run."""
    # Any negative number means not run. pragma: no mutate
    return -1 if duration is None else _ms(duration)  # pragma: no mutate


def _verdict(wait_ms: Any) -> Verdict:
    wait = int(wait_ms)
    # Milliseconds to seconds (a thousandth off is the same wait). pragma: no mutate
    return ADMITTED if wait == 0 else Verdict(False, wait / 1000.0)  # pragma: no mutate


class RedisAdmissionStore:
    """The limits' state in Redis, one script per decision (keys share a hash tag)."""

    combines_any_scope = True

    def __init__(self, url: str, prefix: str = "background:admission:") -> None:
        self.url = url
        self.prefix = prefix
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._pid: int | None = None

    def _script(self, name: str) -> Any:
        if self._pid != os.getpid():
            # A client inherited through fork would share its sockets with the parent.
            # Bounded waits: a Redis that takes connections and never answers
            # fails the check (a retriable error) instead of holding the run.
            self._client = redis.Redis.from_url(
                self.url, socket_timeout=_SOCKET_TIMEOUT, socket_connect_timeout=_SOCKET_TIMEOUT
            )
            self._scripts = {
                "take_slot": self._client.register_script(_TAKE_SLOT),
                "release_slot": self._client.register_script(_RELEASE_SLOT),
                "renew": self._client.register_script(_RENEW),
                "take_token": self._client.register_script(_TAKE_TOKEN),
            }
            self._pid = os.getpid()
        return self._scripts[name]

    def _keys(self, scope: str) -> list[str]:
        """slots, state, starts: one hash tag per scope, so a script's keys share a node."""
        tagged = f"{self.prefix}{{{scope}}}"
        return [f"{tagged}:slots", f"{tagged}:state", f"{tagged}:starts"]

    def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script by its digest (``Script.__call__`` costs more per call: it imports
        the pipeline classes each time); a server that lost it is sent it again."""
        script = self._script(name)
        try:
            return self._client.evalsha(script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return script(keys=keys, args=args)

    def take_slot(
        self,
        scope: str,
        holder: str,
        limit: int,
        lease: float,
        max_wait: float,
        peek: bool = False,
        returning: bool = False,
        release: GivenBack | None = None,
    ) -> Verdict:
        keys = self._keys(scope)
        args: list[Any] = [
            holder, limit, _ms(lease), _ms(max_wait), _ms(DEFAULT_RUN_SECONDS), int(peek),
            _line(returning),
        ]  # fmt: skip
        if release is None:
            return _verdict(self._call("take_slot", keys, args))
        if release.scope == scope:
            args += [release.holder, _run_ms(release.duration)]
            return _verdict(self._call("take_slot", keys, args))
        return self._release_then_take(release, keys, args)

    def _release_then_take(self, release: GivenBack, keys: list[str], args: list[Any]) -> Verdict:
        """Another scope's return and this take: two scripts (each on its own scope's
        keys, so its own hash slot), sent together, in that order, in one round trip."""
        released_keys = self._keys(release.scope)
        released_args = [release.holder, _run_ms(release.duration), _ms(DEFAULT_RUN_SECONDS)]
        release_script, take_script = self._script("release_slot"), self._script("take_slot")
        # No MULTI: each script is atomic, and the two scopes share nothing. pragma: no mutate
        pipe = self._client.pipeline(transaction=False)  # pragma: no mutate
        pipe.evalsha(release_script.sha, 3, *released_keys, *released_args)
        pipe.evalsha(take_script.sha, 3, *keys, *args)
        released, taken = pipe.execute(raise_on_error=False)
        if isinstance(released, redis.exceptions.NoScriptError):
            released = _attempt(lambda: release_script(keys=released_keys, args=released_args))
        if isinstance(released, Exception):
            _log.error(
                "Could not give back a concurrency slot; it is free again when its lease ends",
                exc_info=released,
                extra={"fields": {"scope": release.scope}},
            )
        if isinstance(taken, redis.exceptions.NoScriptError):
            taken = take_script(keys=keys, args=args)
        if isinstance(taken, Exception):
            raise taken
        return _verdict(taken)

    def release_slot(self, scope: str, holder: str, duration: float | None) -> None:
        args = [holder, _run_ms(duration), _ms(DEFAULT_RUN_SECONDS)]
        self._call("release_slot", self._keys(scope), args)

    def renew_slots(self, held: Sequence[tuple[str, str]], lease: float) -> None:
        by_scope: dict[str, list[str]] = {}
        for scope, holder in held:
            by_scope.setdefault(scope, []).append(holder)
        if not by_scope:
            return
        renew = self._script("renew")
        # Each script is atomic; MULTI around them would add nothing. pragma: no mutate
        pipe = self._client.pipeline(transaction=False)  # pragma: no mutate
        for scope, holders in by_scope.items():
            slots, _, starts = self._keys(scope)
            renew(keys=[slots, starts], args=[_ms(lease), *holders], client=pipe)
        pipe.execute()

    def prune(self) -> int:
        """Nothing to do: every key expires by itself (a day after its last use)."""
        return 0

    def holders(self, scope: str) -> list[str]:
        script = self._script("take_slot")  # opens the client in this process
        del script
        now_ms = _ms(time.time())
        members = self._client.zrangebyscore(self._keys(scope)[0], now_ms, "+inf")
        return sorted(member.decode() for member in members)

    def take_token(
        self,
        scope: str,
        rate: RateLimit,
        max_wait: float,
        peek: bool = False,
        returning: bool = False,
    ) -> Verdict:
        args = [_ms(rate.interval), rate.burst, _ms(max_wait), int(peek), _line(returning)]
        # The scope's state key (a rate's scope has no other keys). pragma: no mutate
        state = self._keys(scope)[1]  # pragma: no mutate
        return _verdict(self._call("take_token", [state], args))


def _attempt(call: Callable[[], Any]) -> Any:
    """``call()``'s answer, or the exception it raised."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - returned to the caller, which reports it
        return exc


# -- SQL database --------------------------------------------------------

SLOTS_TABLE = "background_admission_slots"
STATE_TABLE = "background_admission_state"

metadata = MetaData()
slots_table = Table(
    SLOTS_TABLE,
    metadata,
    Column("scope", String(512), primary_key=True),
    Column("holder", String(255), primary_key=True),
    Column("started_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
)
state_table = Table(
    STATE_TABLE,
    metadata,
    Column("scope", String(512), primary_key=True),
    Column("tat", Double, nullable=False),
    Column("line_end", Double, nullable=False),
    Column("retry_end", Double, nullable=False),
    Column("average", Double),
    Column("used_at", Double, nullable=False),
)

# The first statement of every decision: it writes the scope's row, so the
# transaction holds that row's lock (PostgreSQL) or the database's write lock
# (SQLite) until it commits. Deciding takes a read of the slots and a write,
# which no single portable statement does; the lock makes the read and the
# write one step, as the Lua script does on Redis.
_LOCK_STATE = f"""
INSERT INTO {STATE_TABLE} (scope, tat, line_end, retry_end, average, used_at)
VALUES (:scope, 0, 0, 0, NULL, :now)
ON CONFLICT (scope) DO UPDATE SET used_at = excluded.used_at
RETURNING tat, line_end, retry_end, average
"""
_DROP_EXPIRED = f"DELETE FROM {SLOTS_TABLE} WHERE scope = :scope AND expires_at < :now"
_COUNT_SLOTS = f"""
SELECT COUNT(*) AS held, COALESCE(SUM(CASE WHEN holder = :holder THEN 1 ELSE 0 END), 0) AS mine,
       MIN(started_at) AS oldest
FROM {SLOTS_TABLE} WHERE scope = :scope
"""
_TAKE = f"""
INSERT INTO {SLOTS_TABLE} (scope, holder, started_at, expires_at)
VALUES (:scope, :holder, :now, :expires)
ON CONFLICT (scope, holder) DO UPDATE
SET started_at = excluded.started_at, expires_at = excluded.expires_at
"""
_RELEASE = f"DELETE FROM {SLOTS_TABLE} WHERE scope = :scope AND holder = :holder"
_RENEW_SQL = f"""
UPDATE {SLOTS_TABLE} SET expires_at = :expires WHERE scope = :scope AND holder = :holder
"""
_HOLDERS = f"SELECT holder FROM {SLOTS_TABLE} WHERE scope = :scope AND expires_at >= :now"
_SET_LINE = {
    line: f"UPDATE {STATE_TABLE} SET {line} = :at WHERE scope = :scope"
    for line in ("line_end", "retry_end")
}
_SET_AVERAGE = f"UPDATE {STATE_TABLE} SET average = :average WHERE scope = :scope"
_SET_TAT = f"UPDATE {STATE_TABLE} SET tat = :tat WHERE scope = :scope"
_PRUNE_SLOTS = f"DELETE FROM {SLOTS_TABLE} WHERE expires_at < :now"
_PRUNE_STATE = f"""
DELETE FROM {STATE_TABLE}
WHERE used_at < :idle AND tat < :idle AND line_end < :idle AND retry_end < :idle
AND NOT EXISTS (SELECT 1 FROM {SLOTS_TABLE} WHERE {SLOTS_TABLE}.scope = {STATE_TABLE}.scope)
"""

# Any constant: the advisory lock that serializes the tables' creation.
_CREATE_LOCK_ID = 0x6267_6164_6D69_74  # "bgadmit"; pragma: no mutate (any constant works)
# A bound on one decision, not behaviour (a lock wait on SQLite is 30 s at most).
_CALL_TIMEOUT = 60.0  # pragma: no mutate (a bound, not behaviour)
_POOL_SIZE = 2  # pragma: no mutate (a pool size, not behaviour)


class DatabaseAdmissionStore:
    """The limits' state in two tables (SQLite or PostgreSQL), one transaction per decision.

    Time is the caller's wall clock: hosts that share the database need
    synchronised clocks (NTP), as with the deduplication leases.
    """

    # Two scopes' rows locked in one transaction could deadlock with a process
    # locking them the other way round: another scope's return is a transaction
    # of its own, best left to the keeper's thread.
    combines_any_scope = False

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Any = None
        self._engine_pid: int | None = None
        self._ready = asyncio.Lock()
        # Workers call from task threads, the asyncio pool from its own threads:
        # a loop of our own serves them all (as DatabaseLeaseStore does).
        self._loop = LoopThread("admission")

    async def _in_transaction(self, decide: Any, **params: Any) -> Any:
        if self._engine_pid != os.getpid():
            self._ready = asyncio.Lock()
            self._engine, self._engine_pid = None, os.getpid()
        async with self._ready:
            if self._engine is None:
                engine = create_engine(DatabaseConfig(url=self.url, pool_size=_POOL_SIZE))
                try:
                    await ensure_table(engine, slots_table, _CREATE_LOCK_ID)
                    await ensure_table(engine, state_table, _CREATE_LOCK_ID)
                except BaseException:
                    await engine.dispose()
                    raise
                self._engine = engine
        async with self._engine.begin() as connection:
            return await decide(connection, **params)

    def _run(self, decide: Any, **params: Any) -> Any:
        return self._loop.run(self._in_transaction(decide, **params), _CALL_TIMEOUT)

    def close(self) -> None:
        """Dispose this process's engine (its pooled connections)."""
        # An engine inherited through fork is not this process's to dispose.
        if self._engine is not None and self._engine_pid == os.getpid():  # pragma: no mutate
            engine, self._engine = self._engine, None
            self._loop.run(engine.dispose(), _CALL_TIMEOUT)

    def take_slot(
        self,
        scope: str,
        holder: str,
        limit: int,
        lease: float,
        max_wait: float,
        peek: bool = False,
        returning: bool = False,
        release: GivenBack | None = None,
    ) -> Verdict:
        if release is not None and release.scope != scope:
            # Its own transaction first (never two scopes' row locks at once).
            try:
                self.release_slot(release.scope, release.holder, release.duration)
            except Exception:  # noqa: BLE001 - the lease then expires by itself
                _log.exception(
                    "Could not give back a concurrency slot; it is free again when its lease ends",
                    extra={"fields": {"scope": release.scope}},
                )
            release = None
        return self._run(  # type: ignore[no-any-return]
            _take_slot,
            scope=scope, holder=holder, limit=limit, lease=lease, max_wait=max_wait, peek=peek,
            line=_line(returning), release=release,
        )  # fmt: skip

    def release_slot(self, scope: str, holder: str, duration: float | None) -> None:
        self._run(_release_slot, scope=scope, holder=holder, duration=duration)

    def renew_slots(self, held: Sequence[tuple[str, str]], lease: float) -> None:
        # One short transaction per slot: never two row locks held at once, so
        # no deadlock with a decision that deletes expired rows of a scope.
        for scope, holder in held:
            self._run(_renew, scope=scope, holder=holder, lease=lease)

    def prune(self) -> int:
        return self._run(_prune)  # type: ignore[no-any-return]

    def holders(self, scope: str) -> list[str]:
        return self._run(_holders, scope=scope)  # type: ignore[no-any-return]

    def take_token(
        self,
        scope: str,
        rate: RateLimit,
        max_wait: float,
        peek: bool = False,
        returning: bool = False,
    ) -> Verdict:
        return self._run(  # type: ignore[no-any-return]
            _take_token,
            scope=scope,
            rate=rate,
            max_wait=max_wait,
            peek=peek,
            line=_line(returning),
        )


async def _state(connection: AsyncConnection, scope: str) -> Any:
    values = {"scope": scope, "now": time.time()}
    return (await connection.execute(text(_LOCK_STATE), values)).one()


async def _take_slot(
    connection: AsyncConnection,
    scope: str,
    holder: str,
    limit: int,
    lease: float,
    max_wait: float,
    peek: bool,
    line: str,
    release: GivenBack | None,
) -> Verdict:
    state = await _state(connection, scope)
    average = state.average
    if release is not None:
        # Under the scope's row lock: the count below is already without it.
        average = await _give_back(connection, scope, release.holder, release.duration, average)
    now = time.time()
    await connection.execute(text(_DROP_EXPIRED), {"scope": scope, "now": now})
    counts = (
        await connection.execute(text(_COUNT_SLOTS), {"scope": scope, "holder": holder})
    ).one()
    if counts.mine or counts.held < limit:
        if peek:
            return ADMITTED
        values = {"scope": scope, "holder": holder, "now": now, "expires": now + lease}
        await connection.execute(text(_TAKE), values)
        return ADMITTED
    run = DEFAULT_RUN_SECONDS if average is None else average
    if counts.oldest is not None:
        run = max(run, now - counts.oldest)
    # A run's time is positive: the floor only guards a zero. pragma: no mutate
    at = max(now, getattr(state, line)) + max(run / limit, 0.001)  # pragma: no mutate
    return await _told_to_wait(connection, scope, line, now, at, max_wait)


async def _told_to_wait(
    connection: AsyncConnection, scope: str, line: str, now: float, at: float, max_wait: float
) -> Verdict:
    # A wait of exactly max_wait is the same either way. pragma: no mutate
    if at - now > max_wait:  # pragma: no mutate
        return Verdict(False, max_wait)
    await connection.execute(text(_SET_LINE[line]), {"scope": scope, "at": at})
    # ``at`` is past ``now`` by a positive spacing: the floor guards rounding. pragma: no mutate
    return Verdict(False, max(at - now, 0.001))  # pragma: no mutate


async def _release_slot(
    connection: AsyncConnection, scope: str, holder: str, duration: float | None
) -> None:
    state = await _state(connection, scope)
    await _give_back(connection, scope, holder, duration, state.average)


async def _give_back(
    connection: AsyncConnection,
    scope: str,
    holder: str,
    duration: float | None,
    average: float | None,
) -> float | None:
    """Delete ``holder``'s slot (the scope's row locked); the scope's average run time after."""
    await connection.execute(text(_RELEASE), {"scope": scope, "holder": holder})
    if duration is None:
        return average
    average = DEFAULT_RUN_SECONDS if average is None else average
    average += (duration - average) * _AVERAGE_WEIGHT
    await connection.execute(text(_SET_AVERAGE), {"scope": scope, "average": average})
    return average


async def _renew(connection: AsyncConnection, scope: str, holder: str, lease: float) -> None:
    values = {"scope": scope, "holder": holder, "expires": time.time() + lease}
    await connection.execute(text(_RENEW_SQL), values)


async def _prune(connection: AsyncConnection) -> int:
    now = time.time()
    await connection.execute(text(_PRUNE_SLOTS), {"now": now})
    result = await connection.execute(text(_PRUNE_STATE), {"idle": now - IDLE_SECONDS})
    return int(result.rowcount or 0)


async def _holders(connection: AsyncConnection, scope: str) -> list[str]:
    rows = await connection.execute(text(_HOLDERS), {"scope": scope, "now": time.time()})
    return sorted(str(row.holder) for row in rows)


async def _take_token(
    connection: AsyncConnection,
    scope: str,
    rate: RateLimit,
    max_wait: float,
    peek: bool,
    line: str,
) -> Verdict:
    state = await _state(connection, scope)
    now = time.time()
    tolerance = (rate.burst - 1) * rate.interval
    tat = max(state.tat, now)
    if tat - now <= tolerance:
        if peek:
            return ADMITTED
        await connection.execute(text(_SET_TAT), {"scope": scope, "tat": tat + rate.interval})
        return ADMITTED
    at = max(tat - tolerance, getattr(state, line) + rate.interval)
    return await _told_to_wait(connection, scope, line, now, at, max_wait)


def store_from_settings(settings: Any) -> Callable[[], AdmissionStore]:
    """The store the settings select: where the deduplication leases live (built on first use)."""
    url = settings.dedup_store_url
    if settings.dedup_backend == "redis":
        return lambda: RedisAdmissionStore(url)
    return lambda: DatabaseAdmissionStore(url)
