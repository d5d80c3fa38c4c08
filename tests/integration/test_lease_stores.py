"""The lease stores' one promise: a holder changes only its own lease, never a newer holder's.

The trap the module names: a worker whose lease expired (a slow task, a long
queue wait) releases, extends or marks the id after another caller has taken
it; an unconditional ``DELETE`` would free the newer holder's id and let a
third caller run the task at the same time. Each store (Redis, SQLite,
PostgreSQL) is driven through that sequence for real.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.core.background.internals.delivery.lease_stores import (
    REVOKED,
    DatabaseLeaseStore,
    LeaseStore,
    RedisLeaseStore,
    _ms,
)
from tests.support.services import Services

SHORT = 0.3  # seconds: a lease that expires during the test
LONG = 60.0


@pytest.fixture(scope="module", params=["redis", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, stack: Services) -> Iterator[LeaseStore]:
    if request.param == "redis":
        db = stack.claim_redis_db()
        try:
            yield RedisLeaseStore(stack.redis_url_for(db))
        finally:
            stack.release_redis_db(db)
        return
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp(prefix='leases-'))}/leases.db"
    else:
        url = stack.postgres_url
    database_store = DatabaseLeaseStore(url)
    try:
        yield database_store
    finally:
        database_store.close()


def key() -> str:
    return f"lease-{uuid.uuid4().hex}"


def expired_then_taken(store: LeaseStore) -> tuple[str, str, str]:
    """(key, stale token, new holder's token): the first lease expired and another took it."""
    k, stale, new = key(), uuid.uuid4().hex, uuid.uuid4().hex
    assert store.acquire(k, stale, SHORT) == stale
    # Polled, not slept: the store decides when the lease has expired.
    assert wait_until(lambda: store.holder(k) is None), "the short lease never expired"
    assert store.acquire(k, new, LONG) == new  # an expired lease is taken over
    return k, stale, new


def wait_until(condition: Callable[[], bool], timeout: float = SHORT + 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_live_lease_is_not_taken(store: LeaseStore) -> None:
    k, first, second = key(), uuid.uuid4().hex, uuid.uuid4().hex
    assert store.acquire(k, first, LONG) == first
    assert store.acquire(k, second, LONG) == first


def test_release_with_a_stale_token_leaves_the_new_holder(store: LeaseStore) -> None:
    k, stale, new = expired_then_taken(store)
    assert not store.release(k, stale)
    assert store.holder(k) == new
    assert store.acquire(k, uuid.uuid4().hex, LONG) == new  # still refused to a third caller


def test_release_by_the_holder_frees_the_id(store: LeaseStore) -> None:
    k, token = key(), uuid.uuid4().hex
    store.acquire(k, token, LONG)
    assert store.release(k, token)
    assert store.holder(k) is None


def test_extend_with_a_stale_token_does_not_extend(store: LeaseStore) -> None:
    k, stale, new = expired_then_taken(store)
    assert not store.extend(k, stale, LONG)
    assert store.holder(k) == new


def test_extend_by_the_holder_outlives_the_first_lifetime(store: LeaseStore) -> None:
    k, token = key(), uuid.uuid4().hex
    first_expiry = time.monotonic() + SHORT
    store.acquire(k, token, SHORT)
    assert store.extend(k, token, LONG)
    # Not a synchronisation: time must pass beyond the first lifetime, whose end
    # is known, and nothing must happen (there is no condition to poll for).
    time.sleep(max(first_expiry - time.monotonic(), 0) + 0.2)
    assert store.holder(k) == token


def test_marking_revoked_with_a_stale_token_leaves_the_new_holder(store: LeaseStore) -> None:
    k, stale, new = expired_then_taken(store)
    assert not store.mark_revoked(k, stale, LONG)
    assert store.holder(k) == new


def test_the_holder_marks_its_id_revoked(store: LeaseStore) -> None:
    k, token = key(), uuid.uuid4().hex
    store.acquire(k, token, LONG)
    assert store.mark_revoked(k, token, LONG)
    assert store.holder(k) == REVOKED
    assert store.acquire(k, uuid.uuid4().hex, LONG) == REVOKED


def _in_a_forked_child(store: LeaseStore, k: str) -> None:
    if isinstance(store, DatabaseLeaseStore):
        store.close()  # before any use here: the parent's engine is not the child's to close
    token = uuid.uuid4().hex
    ok = store.acquire(k, token, LONG) == token and store.release(k, token)
    if isinstance(store, DatabaseLeaseStore):
        store.close()  # the child's own connections only
    os._exit(0 if ok else 1)


def test_a_forked_process_uses_the_store_on_its_own_connections(store: LeaseStore) -> None:
    """Prefork: a pool process inherits the store. It must build its own loop and connections,
    and closing them must not close the parent's."""
    k = key()
    token = uuid.uuid4().hex
    assert store.acquire(k, token, LONG) == token  # the parent has its loop and connections
    child = multiprocessing.get_context("fork").Process(
        target=_in_a_forked_child, args=(store, key())
    )
    child.start()
    child.join(30)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
    assert store.release(k, token)  # the parent's connections still work
    assert store.holder(k) is None


def test_lease_lifetimes_are_whole_milliseconds_never_zero() -> None:
    assert _ms(2.5) == 2500
    assert _ms(0.0004) == 1  # a lifetime of 0 ms would never expire in Redis (PX 0 is refused)
