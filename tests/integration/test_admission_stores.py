"""The limits' stores (Redis, SQLite, PostgreSQL): each decision atomic, every slot leased.

Driven for real: many callers at once on one scope (each with a store, so a
connection, of its own) never get more slots than the cap; a lease that is
not renewed frees its slot; waiters are told to come back one after another,
not all at once.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import text

from app.core.background.internals.admission.gate import Admission, MustWait
from app.core.background.internals.admission.limits import RateLimit, parse_rate
from app.core.background.internals.admission.stores import (
    STATE_TABLE,
    AdmissionStore,
    DatabaseAdmissionStore,
    GivenBack,
    RedisAdmissionStore,
    Verdict,
    store_from_settings,
)
from tests.support.services import Services

LONG = 60.0
MAX_WAIT = 300.0
CALLERS = 12


@pytest.fixture(scope="module", params=["redis", "sqlite", "postgres"])
def new_store(
    request: pytest.FixtureRequest, stack: Services
) -> Iterator[Callable[[], AdmissionStore]]:
    """Makes stores on one shared state: each its own client or engine, as workers have."""
    made: list[AdmissionStore] = []
    if request.param == "redis":
        db = stack.claim_redis_db()
        url = stack.redis_url_for(db)
    elif request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp(prefix='admission-'))}/limits.db"
    else:
        url = stack.postgres_url

    def make() -> AdmissionStore:
        store: AdmissionStore = (
            RedisAdmissionStore(url) if request.param == "redis" else DatabaseAdmissionStore(url)
        )
        made.append(store)
        return store

    try:
        yield make
    finally:
        for store in made:
            if isinstance(store, DatabaseAdmissionStore):
                store.close()
        if request.param == "redis":
            stack.release_redis_db(db)


def scope() -> str:
    return f"concurrency:tests.admission:{uuid.uuid4().hex}"


def test_a_cap_admits_that_many_and_tells_the_next_when_to_come_back(
    new_store: Callable[[], AdmissionStore],
) -> None:
    store, s = new_store(), scope()
    assert [store.take_slot(s, f"t{i}", 3, LONG, MAX_WAIT).admitted for i in range(3)] == [True] * 3
    refused = store.take_slot(s, "t3", 3, LONG, MAX_WAIT)
    assert not refused.admitted
    assert 0 < refused.wait <= MAX_WAIT
    # The holder's own slot is its own: a delivery of the same task again takes it back.
    assert store.take_slot(s, "t1", 3, LONG, MAX_WAIT).admitted
    assert store.holders(s) == ["t0", "t1", "t2"]
    store.release_slot(s, "t1", 0.05)
    assert store.take_slot(s, "t3", 3, LONG, MAX_WAIT).admitted
    assert store.holders(s) == ["t0", "t2", "t3"]


def test_a_peek_takes_nothing_but_a_refused_peek_queues_like_a_take(
    new_store: Callable[[], AdmissionStore],
) -> None:
    store, s = new_store(), scope()
    assert store.take_slot(s, "a", 1, LONG, MAX_WAIT, peek=True).admitted
    assert store.holders(s) == []  # looked, did not take
    assert store.take_slot(s, "a", 1, LONG, MAX_WAIT).admitted
    first = store.take_slot(s, "b", 1, LONG, MAX_WAIT, peek=True)
    second = store.take_slot(s, "c", 1, LONG, MAX_WAIT)
    assert not first.admitted
    assert second.wait > first.wait  # the peek took its place in the line
    rate, r = parse_rate("t", "10/s"), f"rate:tests.admission:{uuid.uuid4().hex}"
    assert all(store.take_token(r, rate, MAX_WAIT, peek=True).admitted for _ in range(5))
    assert store.take_token(r, rate, MAX_WAIT).admitted  # the peeks took no token
    assert not store.take_token(r, rate, MAX_WAIT, peek=True).admitted


def test_waiters_are_spread_over_time_not_sent_back_together(
    new_store: Callable[[], AdmissionStore],
) -> None:
    store, s = new_store(), scope()
    assert store.take_slot(s, "holder", 1, LONG, MAX_WAIT).admitted
    waits = [store.take_slot(s, f"w{i}", 1, LONG, MAX_WAIT).wait for i in range(5)]
    # Each later waiter comes back later (one expected run after the one before).
    assert waits == sorted(waits)
    assert len(set(waits)) == 5


def test_a_returning_waiter_refused_again_is_next_among_returners_not_behind_the_line(
    new_store: Callable[[], AdmissionStore],
) -> None:
    """Ten newcomers queue up to a second ahead; a returner refused waits one spacing."""
    store, s = new_store(), scope()
    started = time.monotonic()
    assert store.take_slot(s, "holder", 1, LONG, MAX_WAIT).admitted
    line = [store.take_slot(s, f"new{i}", 1, LONG, MAX_WAIT).wait for i in range(10)]
    assert line[-1] >= 0.9  # 10 x 0.1 s (the default run over a cap of 1)
    returners = [
        store.take_slot(s, f"back{i}", 1, LONG, MAX_WAIT, returning=True).wait for i in range(3)
    ]
    # The spacing: the default run (0.1 s) over the cap of 1, or the holder's run so far
    # when that is longer (these calls take longer than 0.1 s on a busy machine).
    spacing = max(0.1, time.monotonic() - started)
    # Spaced among themselves as the line is, starting now, not after it.
    assert returners == sorted(returners)
    assert len(set(returners)) == 3
    assert 0.05 <= returners[0] <= spacing < returners[-1] <= 3 * spacing
    # ... and the newcomers' line did not move for them.
    after = store.take_slot(s, "new10", 1, LONG, MAX_WAIT).wait
    assert line[-1] < after <= line[-1] + max(0.1, time.monotonic() - started) + 0.05

    # One a second: no token comes due while these calls are made, however slow the
    # machine (SQLite's commits wait for the disk).
    rate, r = parse_rate("t", "1/s"), f"rate:tests.admission:{uuid.uuid4().hex}"
    assert store.take_token(r, rate, MAX_WAIT).admitted
    rate_line = [store.take_token(r, rate, MAX_WAIT).wait for _ in range(5)]
    assert rate_line[-1] >= 4.5
    back = store.take_token(r, rate, MAX_WAIT, returning=True)
    assert not back.admitted
    assert back.wait <= rate.interval + 0.002 + 0.05
    assert store.take_token(r, rate, MAX_WAIT).wait >= rate_line[-1]


def test_no_two_callers_take_the_last_slot(new_store: Callable[[], AdmissionStore]) -> None:
    s, cap = scope(), 3
    stores = [new_store() for _ in range(CALLERS)]
    start = threading.Barrier(CALLERS)
    admitted: list[str] = []

    def call(index: int) -> None:
        start.wait()
        if stores[index].take_slot(s, f"t{index}", cap, LONG, MAX_WAIT).admitted:
            admitted.append(f"t{index}")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == cap
    assert stores[0].holders(s) == sorted(admitted)


def test_a_slot_not_renewed_is_free_after_its_lease_and_a_renewed_one_is_kept(
    new_store: Callable[[], AdmissionStore],
) -> None:
    store, s, lease = new_store(), scope(), 1.0
    assert store.take_slot(s, "kept", 2, lease, MAX_WAIT).admitted
    assert store.take_slot(s, "dead", 2, lease, MAX_WAIT).admitted
    deadline = time.monotonic() + 10 * lease
    while "dead" in store.holders(s):
        assert time.monotonic() < deadline, "the unrenewed lease never ended"
        store.renew_slots([(s, "kept")], lease)
        time.sleep(lease / 5)
    assert store.holders(s) == ["kept"]
    assert store.take_slot(s, "next", 2, lease, MAX_WAIT).admitted


def test_a_rate_lets_its_burst_through_then_paces(new_store: Callable[[], AdmissionStore]) -> None:
    store, s = new_store(), f"rate:tests.admission:{uuid.uuid4().hex}"
    rate = parse_rate("t", "20/s")  # burst 2, one every 50 ms
    calls = []
    for _ in range(6):
        before = time.monotonic()
        verdict = store.take_token(s, rate, MAX_WAIT)
        calls.append((before, verdict, time.monotonic()))
    assert [v.admitted for _, v, _ in calls] == [True, True, False, False, False, False]
    # The waiters are told to come back one interval apart. A wait is counted
    # from the moment of its decision, somewhere inside its call: each return
    # time is known within the call's span (and a millisecond of rounding).
    for (b1, first, e1), (b2, second, e2) in itertools.pairwise(calls[2:]):
        earliest = (b2 + second.wait) - (e1 + first.wait)
        latest = (e2 + second.wait) - (b1 + first.wait)
        assert earliest - 0.002 <= rate.interval <= latest + 0.002


def test_a_rate_admits_no_more_than_its_pace_under_contention(
    new_store: Callable[[], AdmissionStore],
) -> None:
    s = f"rate:tests.admission:{uuid.uuid4().hex}"
    rate = RateLimit("50/s", 50.0)  # burst 5
    stores = [new_store() for _ in range(4)]
    admitted: list[float] = []
    calls: list[None] = []
    start = threading.Barrier(len(stores))
    began: list[float] = []

    def hammer(store: AdmissionStore) -> None:
        start.wait()
        began.append(time.monotonic())
        stop = began[0] + 1.0
        while time.monotonic() < stop:
            calls.append(None)
            if store.take_token(s, rate, MAX_WAIT).admitted:
                admitted.append(time.monotonic())

    threads = [threading.Thread(target=hammer, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Every decision was made between the first call and the last answer: in
    # that time, the pace of 50/s plus the burst, never more, whatever the callers.
    elapsed = max(admitted) - min(began)
    assert len(admitted) <= rate.per_second * elapsed + rate.burst, (len(admitted), elapsed)
    # ... and it does give the pace out: nearly all of it, or, when the calls are slow
    # (SQLite's commits on a busy disk), at least half of them.
    assert len(admitted) >= min(40, len(calls) // 2), (len(admitted), len(calls))


def test_a_waiter_behind_a_long_run_comes_back_no_sooner_than_that_run_has_lasted(
    new_store: Callable[[], AdmissionStore],
) -> None:
    """No past runs to average: the age of the oldest holder spaces the waiters, not 100 ms."""
    store, s = new_store(), scope()
    assert store.take_slot(s, "long", 1, LONG, MAX_WAIT).admitted
    time.sleep(1.0)
    assert store.take_slot(s, "waiter", 1, LONG, MAX_WAIT).wait >= 0.9


def test_idle_state_goes_away(
    new_store: Callable[[], AdmissionStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.background.internals.admission import stores

    store, idle, busy = new_store(), scope(), scope()
    assert store.take_slot(idle, "done", 1, LONG, MAX_WAIT).admitted
    store.release_slot(idle, "done", 0.01)
    assert store.take_slot(busy, "running", 1, LONG, MAX_WAIT).admitted
    if isinstance(store, RedisAdmissionStore):
        # Every key expires by itself: no row of state outlives a day idle.
        client = store._client
        keys = client.keys(f"{store.prefix}*")
        assert keys
        assert all(0 < client.pttl(key) <= stores.IDLE_SECONDS * 1000 for key in keys)
        assert store.prune() == 0
        return
    assert isinstance(store, DatabaseAdmissionStore)
    monkeypatch.setattr(stores, "IDLE_SECONDS", 1.0)
    store.prune()  # whatever earlier tests left idle
    assert {idle, busy} <= _state_scopes(store)  # used just now: not idle yet
    time.sleep(1.2)
    store.prune()
    # The idle scope's state went; the one with a running holder kept its state and slot.
    assert idle not in _state_scopes(store)
    assert busy in _state_scopes(store)
    assert store.holders(busy) == ["running"]
    assert not store.take_slot(busy, "next", 1, LONG, MAX_WAIT).admitted


def test_prune_counts_the_scopes_it_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.background.internals.admission import stores

    store = DatabaseAdmissionStore(f"sqlite+aiosqlite:///{tmp_path}/limits.db")
    try:
        monkeypatch.setattr(stores, "IDLE_SECONDS", 0.5)
        assert store.prune() == 0  # nothing yet
        for s in (scope(), scope()):
            assert store.take_slot(s, "done", 1, LONG, MAX_WAIT).admitted
            store.release_slot(s, "done", 0.01)
        time.sleep(0.7)
        assert store.prune() == 2
        assert store.prune() == 0
    finally:
        store.close()


def _state_scopes(store: DatabaseAdmissionStore) -> set[str]:
    async def read(connection: Any) -> set[str]:
        rows = await connection.execute(text(f"SELECT scope FROM {STATE_TABLE}"))
        return {str(row.scope) for row in rows}

    return store._run(read)  # type: ignore[no-any-return]


def test_waits_are_capped_at_the_longest_wait(new_store: Callable[[], AdmissionStore]) -> None:
    store, s = new_store(), scope()
    assert store.take_slot(s, "holder", 1, LONG, 0.5).admitted
    verdicts = [store.take_slot(s, f"w{i}", 1, LONG, 0.5) for i in range(20)]
    assert not any(v.admitted for v in verdicts)
    assert max(v.wait for v in verdicts) <= 0.5


def test_waiters_are_spaced_by_the_scopes_average_run_over_its_cap(
    new_store: Callable[[], AdmissionStore],
) -> None:
    """Before any run: 100 ms; one run of 2 s moves the average a fifth of the way (0.48 s)."""
    store, cap = new_store(), 2
    fresh = scope()
    for holder in ("a", "b"):
        assert store.take_slot(fresh, holder, cap, LONG, MAX_WAIT).admitted
    assert 0.04 <= store.take_slot(fresh, "w", cap, LONG, MAX_WAIT).wait <= 0.1  # 0.1 / 2

    learned = scope()
    assert store.take_slot(learned, "done", cap, LONG, MAX_WAIT).admitted
    store.release_slot(learned, "done", 2.0)
    # A run refused by its rate gave its slot back without running: not averaged.
    assert store.take_slot(learned, "unrun", cap, LONG, MAX_WAIT).admitted
    store.release_slot(learned, "unrun", None)
    for holder in ("a", "b"):
        assert store.take_slot(learned, holder, cap, LONG, MAX_WAIT).admitted
    wait = store.take_slot(learned, "w", cap, LONG, MAX_WAIT).wait
    assert 0.2 <= wait <= 0.25  # (0.1 + (2.0 - 0.1) x 0.2) / 2 = 0.24


def test_the_first_waiter_of_a_rate_comes_back_when_a_token_is_due(
    new_store: Callable[[], AdmissionStore],
) -> None:
    store, s = new_store(), f"rate:tests.admission:{uuid.uuid4().hex}"
    rate = parse_rate("t", "10/s")  # burst 1, one every 100 ms
    assert store.take_token(s, rate, MAX_WAIT).admitted
    first = store.take_token(s, rate, MAX_WAIT)
    assert not first.admitted
    assert first.wait <= rate.interval + 0.002

    burst, b = parse_rate("t", "20/s"), f"rate:tests.admission:{uuid.uuid4().hex}"
    assert burst.burst == 2  # two at once, then one every 50 ms
    assert store.take_token(b, burst, MAX_WAIT).admitted
    assert store.take_token(b, burst, MAX_WAIT).admitted
    after_burst = store.take_token(b, burst, MAX_WAIT)
    assert not after_burst.admitted
    assert after_burst.wait <= burst.interval + 0.002


def test_a_take_that_gives_back_a_slot_of_its_scope_frees_it_before_it_counts(
    new_store: Callable[[], AdmissionStore],
) -> None:
    """At the cap, a run's take that returns the previous run's slot is admitted (the
    return comes first); the cap still holds for everyone else."""
    store, s = new_store(), scope()
    assert store.take_slot(s, "first", 1, LONG, MAX_WAIT).admitted
    carried = GivenBack(s, "first", 0.01)
    assert store.take_slot(s, "second", 1, LONG, MAX_WAIT, release=carried).admitted
    assert store.holders(s) == ["second"]
    assert not store.take_slot(s, "other", 1, LONG, MAX_WAIT).admitted
    assert store.holders(s) == ["second"]


def test_a_take_refused_still_gives_back_the_slot_it_carries(
    new_store: Callable[[], AdmissionStore],
) -> None:
    """The return does not depend on the take's verdict, of its scope or another."""
    store, full, done = new_store(), scope(), scope()
    assert store.take_slot(full, "running", 1, LONG, MAX_WAIT).admitted
    assert store.take_slot(done, "finished", 1, LONG, MAX_WAIT).admitted
    finished = GivenBack(done, "finished", 0.01)
    refused = store.take_slot(full, "next", 1, LONG, MAX_WAIT, release=finished)
    assert not refused.admitted
    assert refused.wait > 0
    assert store.holders(done) == []
    assert store.holders(full) == ["running"]
    # Of its own scope: a return of a slot already gone frees nothing, but its run's
    # time counts, before the refused take is told its wait: (0.1 - 0.09 x 0.2) moved
    # by (2.0 - 0.082) x 0.2 is 0.466, over a cap of 1.
    assert store.take_slot(done, "a", 1, LONG, MAX_WAIT).admitted
    gone = GivenBack(done, "finished", 2.0)
    told = store.take_slot(done, "b", 1, LONG, MAX_WAIT, release=gone)
    assert not told.admitted
    assert 0.42 <= told.wait <= 0.47
    assert store.holders(done) == ["a"]


@pytest.mark.parametrize("where", ["same scope", "another scope"])
def test_a_slot_returned_with_a_take_feeds_the_spacing_as_a_release_does(
    new_store: Callable[[], AdmissionStore], where: str
) -> None:
    """As ``test_waiters_are_spaced_by_the_scopes_average_run_over_its_cap``, every
    return carried by a take: a run of 2 s moves the average, an unrun one does not."""
    store, cap, learned = new_store(), 2, scope()
    carrier = learned if where == "same scope" else scope()

    def take_returning(holder: str, duration: float | None) -> None:
        assert store.take_slot(
            carrier, f"carrier-{holder}", 100, LONG, MAX_WAIT,
            release=GivenBack(learned, holder, duration),
        ).admitted  # fmt: skip
        store.release_slot(carrier, f"carrier-{holder}", None)  # unrun: no average moves

    assert store.take_slot(learned, "done", cap, LONG, MAX_WAIT).admitted
    take_returning("done", 2.0)
    assert store.take_slot(learned, "unrun", cap, LONG, MAX_WAIT).admitted
    take_returning("unrun", None)
    for holder in ("a", "b"):
        assert store.take_slot(learned, holder, cap, LONG, MAX_WAIT).admitted
    wait = store.take_slot(learned, "w", cap, LONG, MAX_WAIT).wait
    assert 0.2 <= wait <= 0.25  # (0.1 + (2.0 - 0.1) x 0.2) / 2 = 0.24


def test_a_slot_passed_on_with_a_take_is_never_caught_by_another_caller(
    new_store: Callable[[], AdmissionStore],
) -> None:
    """A scope at its cap whose holders pass their slots on (return and take in one
    step) while newcomers keep asking: every pass is admitted, no newcomer ever is."""
    s, cap, passes = scope(), 3, 15
    stores = [new_store() for _ in range(2 * cap)]
    for index in range(cap):
        assert stores[0].take_slot(s, f"h{index}-0", cap, LONG, MAX_WAIT).admitted
    start, done = threading.Barrier(len(stores)), threading.Event()
    refused_passes: list[str] = []
    caught: list[str] = []

    def pass_on(index: int) -> None:
        store = stores[index]
        start.wait()
        for n in range(1, passes + 1):
            previous = GivenBack(s, f"h{index}-{n - 1}", 0.001)
            verdict = store.take_slot(s, f"h{index}-{n}", cap, LONG, MAX_WAIT, release=previous)
            if not verdict.admitted:
                refused_passes.append(f"h{index}-{n}")

    def ask(index: int) -> None:
        store = stores[index]
        start.wait()
        n = 0
        while not done.is_set():
            n += 1
            if store.take_slot(s, f"new{index}-{n}", cap, LONG, 0.01).admitted:
                caught.append(f"new{index}-{n}")

    passers = [threading.Thread(target=pass_on, args=(i,)) for i in range(cap)]
    askers = [threading.Thread(target=ask, args=(i,)) for i in range(cap, 2 * cap)]
    for thread in [*passers, *askers]:
        thread.start()
    for thread in passers:
        thread.join()
    done.set()
    for thread in askers:
        thread.join()
    assert caught == []
    assert refused_passes == []
    assert stores[0].holders(s) == sorted(f"h{i}-{passes}" for i in range(cap))


def test_the_keeper_renews_a_held_slot_until_it_is_dropped(stack: Services) -> None:
    """A run keeps its slot past its lease while it runs; unrenewed, it lapses within one."""
    db = stack.claim_redis_db()
    try:
        gate, lease, s = Admission(), 1.0, scope()
        gate.configure(lambda: RedisAdmissionStore(stack.redis_url_for(db)), lease)
        assert gate.store.take_slot(s, "run", 1, lease, MAX_WAIT).admitted
        gate.keeper.hold((s, "run"))
        time.sleep(2.5 * lease)  # two leases: only renewals kept it
        assert gate.store.holders(s) == ["run"]
        gate.keeper.drop((s, "run"))  # as if its process had died: no more renewals
        deadline = time.monotonic() + 2 * lease
        while gate.store.holders(s):
            assert time.monotonic() < deadline, "the slot outlived its lease unrenewed"
            time.sleep(0.05)
    finally:
        stack.release_redis_db(db)


def test_slots_given_back_are_sent_by_the_keeper_and_flush_sends_the_rest(
    stack: Services,
) -> None:
    """A run does not wait for its slot's return: the keeper's thread sends it, and
    what it has not sent when the process ends goes with ``flush``."""
    db = stack.claim_redis_db()
    try:
        gate, s = Admission(), scope()
        gate.configure(lambda: RedisAdmissionStore(stack.redis_url_for(db)), LONG)
        assert gate.store.take_slot(s, "first", 2, LONG, MAX_WAIT).admitted
        gate.keeper.hold((s, "first"))
        gate.keeper.give_back((s, "first"), 0.01)
        deadline = time.monotonic() + 5
        while gate.store.holders(s):
            assert time.monotonic() < deadline, "the keeper did not give the slot back"
            time.sleep(0.01)

        holders = [f"run{i}" for i in range(20)]
        for holder in holders:
            assert gate.store.take_slot(s, holder, 100, LONG, MAX_WAIT).admitted
            gate.keeper.hold((s, holder))
        for holder in holders:
            gate.keeper.give_back((s, holder), 0.01)
        gate.keeper.flush()  # returns once every slot given back is in the store
        assert gate.store.holders(s) == []
    finally:
        stack.release_redis_db(db)


class RecordingStore(RedisAdmissionStore):
    """A Redis store that notes how each slot went back: with a take, or alone
    (``fail_carrying``: a take that carries a return fails, as on a lost connection)."""

    def __init__(self, url: str, fail_carrying: bool = False) -> None:
        super().__init__(url)
        self.returned: list[tuple[str, str]] = []
        self.fail_carrying = fail_carrying

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
        if release is not None:
            if self.fail_carrying:
                raise ConnectionError("the store went away")
            self.returned.append(("with a take", release.holder))
        return super().take_slot(
            scope, holder, limit, lease, max_wait, peek, returning, release=release
        )

    def release_slot(self, scope: str, holder: str, duration: float | None) -> None:
        self.returned.append(("alone", holder))
        super().release_slot(scope, holder, duration)


@contextlib.contextmanager
def keeper_gate(
    stack: Services, monkeypatch: pytest.MonkeyPatch, linger: float, fail_carrying: bool = False
) -> Iterator[tuple[Admission, RecordingStore, Callable[[int], Any]]]:
    """A gate on a Redis database of its own, slots lingering ``linger`` s, and a maker
    of capped tasks (each with a scope of its own) whose runs a test enters by hand."""
    from app.core.background import TaskContext, celery_app, simple_task
    from app.core.background.internals.admission import gate as gate_module
    from app.core.background.internals.registry import registry

    monkeypatch.setattr(gate_module, "GIVE_BACK_LINGER", linger)
    db = stack.claim_redis_db()
    names: list[str] = []

    def capped_task(cap: int) -> Any:
        name = f"tests.keeper.{uuid.uuid4().hex[:8]}"

        @simple_task(name=name, concurrency=cap)
        def capped(ctx: TaskContext) -> None:
            """A capped no-op."""

        names.append(name)
        return celery_app.tasks[name]

    store = RecordingStore(stack.redis_url_for(db), fail_carrying)
    gate = Admission()
    gate.configure(lambda: store, LONG)
    try:
        yield gate, store, capped_task
    finally:
        gate.keeper.flush()
        stack.release_redis_db(db)
        for name in names:
            registry.release(name)
            celery_app.tasks.pop(name, None)


def run_of(task_id: str) -> Any:
    """What ``Admission.enter`` reads of a run's context: its id."""
    return SimpleNamespace(task_id=task_id)


def test_a_slot_given_back_goes_with_the_next_take_and_the_keeper_does_not_send_it_again(
    stack: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    linger = 0.5
    with keeper_gate(stack, monkeypatch, linger) as (gate, store, capped_task):
        task = capped_task(1)
        scope_of_task = f"concurrency:{task.name}:"
        first = gate.enter(task, run_of("first"), (), {})
        assert first is not None
        first.release()
        # At a cap of 1: admitted because the return went first, in the same call.
        second = gate.enter(task, run_of("second"), (), {})
        assert second is not None
        assert store.returned == [("with a take", "first")]
        assert store.holders(scope_of_task) == ["second"]
        time.sleep(linger + 0.3)  # the keeper has looked since, and found nothing to send
        gate.keeper.flush()
        assert store.returned == [("with a take", "first")]
        second.release()
        gate.keeper.flush()
        assert store.returned == [("with a take", "first"), ("alone", "second")]
        assert store.holders(scope_of_task) == []


def test_a_slot_nobody_claims_is_sent_alone_once_its_linger_is_over(
    stack: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held no longer than the linger past its run: whether the keeper's thread was
    looking (slots given back lately) or asleep until its next renewal."""
    linger = 0.5
    with keeper_gate(stack, monkeypatch, linger) as (gate, store, capped_task):
        task = capped_task(1)
        scope_of_task = f"concurrency:{task.name}:"
        for run in ("first", "later"):
            ticket = gate.enter(task, run_of(run), (), {})
            assert ticket is not None
            time.sleep(3 * linger)  # the thread has nothing to look for: asleep
            given_back = time.monotonic()
            ticket.release()
            while store.holders(scope_of_task):
                assert time.monotonic() - given_back < linger + 1.0, "not sent after the linger"
                time.sleep(0.01)
            assert time.monotonic() - given_back >= linger - 0.05  # it waited for a claim
        assert store.returned == [("alone", "first"), ("alone", "later")]


def test_a_slot_claimed_by_a_take_that_fails_goes_back_all_the_same(
    stack: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    with keeper_gate(stack, monkeypatch, 0.05, fail_carrying=True) as (gate, store, capped_task):
        task = capped_task(5)
        scope_of_task = f"concurrency:{task.name}:"
        first = gate.enter(task, run_of("first"), (), {})
        assert first is not None
        first.release()
        with pytest.raises(ConnectionError):
            gate.enter(task, run_of("second"), (), {})
        deadline = time.monotonic() + 5
        while store.holders(scope_of_task):
            assert time.monotonic() < deadline, "the claimed slot was never given back"
            time.sleep(0.01)
        assert store.returned == [("alone", "first")]


def test_a_take_refused_still_returns_the_slot_it_claimed(
    stack: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Redis a take carries a return of any scope: refused, it returned it all the same."""
    with keeper_gate(stack, monkeypatch, 0.5) as (gate, store, capped_task):
        done, full = capped_task(1), capped_task(1)
        assert store.take_slot(f"concurrency:{full.name}:", "elsewhere", 1, LONG, MAX_WAIT).admitted
        ticket = gate.enter(done, run_of("first"), (), {})
        assert ticket is not None
        ticket.release()
        with pytest.raises(MustWait):
            gate.enter(full, run_of("second"), (), {})
        assert store.returned == [("with a take", "first")]
        assert store.holders(f"concurrency:{done.name}:") == []
        gate.keeper.flush()
        assert store.returned == [("with a take", "first")]


def test_runs_in_many_threads_return_each_slot_once(
    stack: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The threads and asyncio pools enter at once: each slot given back is claimed by
    one take, or sent alone by the keeper, exactly once."""
    threads, runs = 8, 30
    with keeper_gate(stack, monkeypatch, 0.01) as (gate, store, capped_task):
        tasks = [capped_task(1000), capped_task(1000)]
        start = threading.Barrier(threads)

        def run(index: int) -> None:
            start.wait()
            for n in range(runs):
                ticket = gate.enter(tasks[n % 2], run_of(f"t{index}-{n}"), (), {})
                assert ticket is not None
                ticket.release()

        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        gate.keeper.flush()
        counts = Counter(holder for _, holder in store.returned)
        assert counts == Counter(f"t{i}-{n}" for i in range(threads) for n in range(runs))
        assert any(how == "with a take" for how, _ in store.returned)
        for task in tasks:
            assert store.holders(f"concurrency:{task.name}:") == []


def test_the_consumer_looks_at_a_keyed_task_now_and_then_until_a_look_is_refused(
    stack: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core.background import TaskContext, celery_app, simple_task
    from app.core.background.internals.admission import gate as gate_module
    from app.core.background.internals.registry import registry

    pause = 0.3
    monkeypatch.setattr(gate_module, "SCREEN_PAUSE", pause)
    name = f"tests.screen.{uuid.uuid4().hex[:8]}"

    @simple_task(name=name, concurrency=1, concurrency_key=lambda tenant, **_: tenant)
    def per_tenant(ctx: TaskContext, tenant: str) -> None:
        """One run per tenant at once."""

    task: Any = celery_app.tasks[name]
    db = stack.claim_redis_db()
    try:
        gate = Admission()
        gate.configure(lambda: RedisAdmissionStore(stack.redis_url_for(db)), LONG)
        assert not gate.seems_clear(task)  # never looked at: decode and look
        assert gate.screen(task, (), {"tenant": "a"}) is None
        assert gate.seems_clear(task)  # found free: the next messages pass unlooked
        time.sleep(pause + 0.05)
        assert not gate.seems_clear(task)  # the pause is over: look again

        full = f"concurrency:{name}:b"
        assert gate.store.take_slot(full, "running", 1, LONG, MAX_WAIT).admitted
        waiting = gate.screen(task, (), {"tenant": "b"})
        assert waiting is not None
        assert waiting.key == "b"
        assert not gate.seems_clear(task)
        # A free tenant does not end the looking while a refusal is recent.
        assert gate.screen(task, (), {"tenant": "c"}) is None
        assert not gate.seems_clear(task)
        time.sleep(pause + 0.05)
        assert gate.screen(task, (), {"tenant": "c"}) is None
        assert gate.seems_clear(task)
    finally:
        stack.release_redis_db(db)
        registry.release(name)
        celery_app.tasks.pop(name, None)


def test_a_missing_table_on_postgresql_is_an_error_that_leaves_no_connection_open(
    stack: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the migrations in charge, a store on a database without its tables says so,
    keeps no connection of the failed check, and works once the tables are there."""
    import asyncio

    import asyncpg

    from app.core.background.internals.exceptions import MissingTablesError
    from app.core.background.internals.session import create_table, table_creation

    monkeypatch.setattr(table_creation, "on_servers", False)
    with stack.private_database() as url:
        name = url.rsplit("/", 1)[1]

        async def connections() -> int:
            admin = await asyncpg.connect(stack.postgres_dsn)
            try:
                count = await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", name
                )
            finally:
                await admin.close()
            return int(count)

        store = DatabaseAdmissionStore(url)
        try:
            with pytest.raises(MissingTablesError, match="background_admission"):
                store.take_slot(scope(), "run", 1, LONG, MAX_WAIT)
            assert asyncio.run(connections()) == 0  # the check's engine is disposed

            async def migrate() -> None:
                from sqlalchemy.ext.asyncio import create_async_engine

                from app.core.background.internals.admission.stores import (
                    slots_table,
                    state_table,
                )

                engine = create_async_engine(url)
                try:
                    for table in (slots_table, state_table):
                        await create_table(engine, table, 0)
                finally:
                    await engine.dispose()

            asyncio.run(migrate())
            assert store.take_slot(scope(), "run", 1, LONG, MAX_WAIT).admitted
        finally:
            store.close()


def test_the_store_is_where_the_leases_are() -> None:
    from app.core.config import Settings

    redis_broker = "redis://broker:6379/0"
    on_redis = store_from_settings(Settings(celery_broker_url=redis_broker))()
    assert isinstance(on_redis, RedisAdmissionStore)
    assert on_redis.url == redis_broker
    own = store_from_settings(
        Settings(celery_broker_url=redis_broker, background_dedup_redis_url="redis://limits:1/2")
    )()
    assert isinstance(own, RedisAdmissionStore)
    assert own.url == "redis://limits:1/2"
    on_database = store_from_settings(
        Settings(celery_broker_url="amqp://guest@rabbit//", database_url="sqlite+aiosqlite:///x.db")
    )()
    assert isinstance(on_database, DatabaseAdmissionStore)
    assert on_database.url == "sqlite+aiosqlite:///x.db"
    chosen = store_from_settings(
        Settings(
            celery_broker_url="amqp://guest@rabbit//",
            database_url="sqlite+aiosqlite:///x.db",
            background_dedup_database_url="postgresql+asyncpg://db/limits",
        )
    )()
    assert isinstance(chosen, DatabaseAdmissionStore)
    assert chosen.url == "postgresql+asyncpg://db/limits"
