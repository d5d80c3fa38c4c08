"""The atomic Redis result backend, against this run's real Redis database."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from celery import states
from celery.backends.redis import RedisBackend

from app.core.background import celery_app
from app.core.background.internals.operations.status import get_task_status, record_revoked
from app.core.background.internals.transport.loop_writes import LoopWrites, close_on_this_loop
from app.core.background.internals.transport.result_backend import (
    AtomicRedisBackend,
    _Store,
    lost_runs,
)
from tests.support.services import Services

pytestmark = pytest.mark.usefixtures("redis_service")

T = TypeVar("T")
WAIT = 10.0


@pytest.fixture
def backend() -> AtomicRedisBackend:
    chosen = celery_app.backend
    assert isinstance(chosen, AtomicRedisBackend)
    return chosen


def new_id() -> str:
    return f"rb-{uuid.uuid4().hex}"


def test_redis_urls_select_the_atomic_backend_which_is_still_celerys(
    backend: AtomicRedisBackend,
) -> None:
    assert isinstance(backend, RedisBackend)
    assert backend.url == celery_app.conf.result_backend


def test_states_are_stored_with_the_expiry_and_read_back(
    backend: AtomicRedisBackend, redis_client: Any
) -> None:
    task_id = new_id()
    backend.store_result(task_id, {"done": 1}, states.STARTED)
    assert backend.get_task_meta(task_id)["status"] == states.STARTED
    backend.store_result(task_id, {"status": "success", "n": 2}, states.SUCCESS)
    meta = backend.get_task_meta(task_id)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, {"status": "success", "n": 2})
    ttl = redis_client.ttl(backend.get_key_for_task(task_id))
    assert 0 < ttl <= backend.expires


@pytest.mark.parametrize("late_state", [states.STARTED, states.RETRY, "PROGRESS", states.FAILURE])
def test_a_late_write_never_replaces_a_success(
    backend: AtomicRedisBackend, late_state: str
) -> None:
    task_id = new_id()
    backend.store_result(task_id, {"ok": True}, states.SUCCESS)
    late_result: Any = ValueError("late") if late_state == states.FAILURE else None
    backend.store_result(task_id, late_result, late_state)
    assert backend.get_task_meta(task_id)["status"] == states.SUCCESS


def test_a_result_that_mentions_success_is_not_taken_for_the_state(
    backend: AtomicRedisBackend,
) -> None:
    task_id = new_id()
    backend.store_result(task_id, {"message": "SUCCESS", "status": "SUCCESS"}, "PROGRESS")
    backend.store_result(task_id, None, states.RETRY)
    assert backend.get_task_meta(task_id)["status"] == states.RETRY


def test_one_round_trip_per_state_and_subscribers_get_it(
    backend: AtomicRedisBackend, redis_service: Services
) -> None:
    """No GET before the write: one EVALSHA, whose own GET/SET/PUBLISH run inside Redis."""
    task_id = new_id()
    key = backend.get_key_for_task(task_id).decode()
    backend.store_result(new_id(), None, states.STARTED)  # loads the script
    listener = redis_service.redis().pubsub()
    listener.subscribe(key)
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    seen: list[dict[str, Any]] = []
    with redis_service.redis().monitor() as monitor:
        done = threading.Event()

        def store() -> None:
            backend.store_result(task_id, {"n": 1}, states.SUCCESS)
            done.set()

        writer = threading.Thread(target=store)
        writer.start()
        for command in monitor.listen():
            if key in command["command"]:
                seen.append(command)
            if done.is_set() and any("PUBLISH" in c["command"] for c in seen):
                break
        writer.join()
    from_clients = [c["command"].split()[0] for c in seen if c.get("client_type") != "lua"]
    assert from_clients == ["EVALSHA"]
    message = listener.get_message(timeout=5)
    assert message is not None
    assert backend.decode(message["data"])["status"] == states.SUCCESS
    listener.close()


def test_success_wins_against_concurrent_state_writes(backend: AtomicRedisBackend) -> None:
    """Many writers of STARTED race one SUCCESS: whatever the interleaving, SUCCESS stays."""
    task_ids = [new_id() for _ in range(20)]
    start = threading.Barrier(5)

    def write_started() -> None:
        start.wait()
        for task_id in task_ids * 10:
            backend.store_result(task_id, None, states.STARTED)

    writers = [threading.Thread(target=write_started) for _ in range(4)]
    for writer in writers:
        writer.start()
    start.wait()
    for task_id in task_ids:
        backend.store_result(task_id, "done", states.SUCCESS)
    for writer in writers:
        writer.join()
    assert {backend.get_task_meta(t)["status"] for t in task_ids} == {states.SUCCESS}


def test_revoking_a_finished_task_keeps_its_result(backend: AtomicRedisBackend) -> None:
    finished, queued = new_id(), new_id()
    backend.store_result(finished, {"status": "success"}, states.SUCCESS)
    record_revoked(celery_app, finished, "too late")
    record_revoked(celery_app, queued, "cancelled")
    assert get_task_status(celery_app, finished).state == "success"
    assert get_task_status(celery_app, queued).state == "revoked"


def _lost_after_start(backend: AtomicRedisBackend, task_id: str, pid: int) -> int:
    """Store STARTED for ``task_id`` by process ``pid``; return the lost runs it reported."""
    backend.store_result(task_id, {"pid": pid, "hostname": "w@test"}, states.STARTED)
    seen = lost_runs.get()
    assert seen is not None
    assert seen[0] == task_id
    return seen[1]


def test_a_start_over_a_run_that_never_ended_counts_it_as_lost(
    backend: AtomicRedisBackend,
) -> None:
    """STARTED over STARTED or PROGRESS: an earlier delivery died; over anything else: no loss."""
    task_id = new_id()
    assert _lost_after_start(backend, task_id, pid=1) == 0
    assert _lost_after_start(backend, task_id, pid=2) == 1  # the first run never ended
    backend.store_result(task_id, {"done": 1}, "PROGRESS")
    assert _lost_after_start(backend, task_id, pid=3) == 2  # nor did the second
    backend.store_result(task_id, None, states.RETRY)
    assert _lost_after_start(backend, task_id, pid=4) == 2  # a retry ended the third: kept
    backend.store_result(task_id, None, states.PENDING)  # a Reject(requeue=True)
    assert _lost_after_start(backend, task_id, pid=5) == 2
    other = new_id()
    backend.store_result(other, {"ok": 1}, states.SUCCESS)
    assert _lost_after_start(backend, other, pid=6) == 0  # a success is kept, nothing counted


def test_the_same_start_sent_again_is_not_a_lost_run(backend: AtomicRedisBackend) -> None:
    """A client's retry after a lost reply resends the identical STARTED: no run died."""
    task_id = new_id()
    assert _lost_after_start(backend, task_id, pid=1) == 0
    assert _lost_after_start(backend, task_id, pid=1) == 0
    assert _lost_after_start(backend, task_id, pid=2) == 1


def _started(backend: AtomicRedisBackend, task_id: str, pid: int = 1) -> _Store:
    meta = {"status": states.STARTED, "result": {"pid": pid}, "task_id": task_id}
    key = backend.get_key_for_task(task_id)
    return _Store(backend, (key, backend.encode(meta), backend.expires, states.STARTED))


def _on_a_loop(backend: AtomicRedisBackend, use: Callable[[LoopWrites], Awaitable[T]]) -> T:
    """``use(writes)`` with the asyncio pool's writer, on a loop of its own, closed after."""

    async def run() -> T:
        writes = backend._loop_writes()
        try:
            return await use(writes)
        finally:
            await close_on_this_loop()

    return asyncio.run(run())


def test_writes_sent_together_each_get_their_own_outcome(backend: AtomicRedisBackend) -> None:
    """The asyncio pool's batch: one pipeline, a reply per write, in order."""
    finished, running, fresh = new_id(), new_id(), new_id()
    backend.store_result(finished, "done", states.SUCCESS)
    backend.store_result(running, {"pid": 9}, states.STARTED)
    stores = [_started(backend, finished), _started(backend, running), _started(backend, fresh)]
    # 0: a stored success is kept; 1 + runs lost before: one for the run that never ended.
    assert _on_a_loop(backend, lambda writes: writes.send(list(stores))) == [0, 2, 1]
    assert backend.get_task_meta(finished)["status"] == states.SUCCESS
    assert backend.get_task_meta(fresh)["status"] == states.STARTED


def test_a_batch_after_redis_lost_its_scripts_is_written_alone(
    backend: AtomicRedisBackend, redis_client: Any
) -> None:
    """NOSCRIPT for every write of the pipeline (a restarted Redis): each is made again alone."""
    backend.store_result(new_id(), None, states.STARTED)  # the script is loaded
    redis_client.script_flush()  # the session's own Redis server (tests/support/services.py)
    ids = [new_id() for _ in range(3)]
    stores = [_started(backend, t) for t in ids]
    assert _on_a_loop(backend, lambda writes: writes.send(stores)) == [1, 1, 1]
    assert {backend.get_task_meta(t)["status"] for t in ids} == {states.STARTED}
    assert not any(redis_client.exists(f"{backend.get_key_for_task(t).decode()}:lost-runs")
                   for t in ids)  # fmt: skip


def test_writes_queued_while_a_pipeline_is_out_go_together_in_the_next(
    backend: AtomicRedisBackend, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One run writes, then 19 while its pipeline is out: they go in one pipeline after it."""
    ids = [new_id() for _ in range(20)]
    backend.store_result(ids[5], "done", states.SUCCESS)
    batches: list[int] = []
    send = LoopWrites.send

    async def counted(self: LoopWrites, writes: list[Any]) -> list[Any]:
        batches.append(len(writes))
        return await send(self, writes)

    monkeypatch.setattr(LoopWrites, "send", counted)

    async def one_then_nineteen(writes: LoopWrites) -> list[Any]:
        # Redis holds the first pipeline for 0.5 s (the session's own server).
        redis_client.client_pause(500, all=False)
        first = asyncio.ensure_future(writes.write(_started(backend, ids[0])))
        await asyncio.sleep(0.2)
        rest = await asyncio.gather(*(writes.write(_started(backend, t)) for t in ids[1:]))
        return [await first, *rest]

    replies = _on_a_loop(backend, one_then_nineteen)
    assert batches == [1, 19]
    assert replies == [0 if n == 5 else 1 for n in range(20)]
    assert [backend.get_task_meta(t)["status"] for t in ids] == [
        states.SUCCESS if n == 5 else states.STARTED for n in range(20)
    ]


def test_a_cancelled_run_waits_for_its_write_then_the_cancellation_lands(
    backend: AtomicRedisBackend, redis_client: Any
) -> None:
    """A time limit during a write never leaves it half-way: the run unwinds once it is made."""
    task_id = new_id()
    backend.store_result(new_id(), None, states.STARTED)  # the script is loaded

    async def cancelled_during_the_write(writes: LoopWrites) -> tuple[bool, bool, bool]:
        # Redis holds every write for 1 s (the session's own server).
        redis_client.client_pause(1000, all=False)
        run = asyncio.ensure_future(writes.write(_started(backend, task_id)))
        await asyncio.sleep(0.2)
        run.cancel()
        await asyncio.sleep(0.2)
        held = not run.done()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(run, WAIT)
        return held, run.cancelled(), redis_client.exists(backend.get_key_for_task(task_id)) == 1

    held, cancelled, written = _on_a_loop(backend, cancelled_during_the_write)
    assert (held, cancelled, written) == (True, True, True)


def test_a_write_whose_connection_was_cut_is_made_again_alone(
    backend: AtomicRedisBackend, redis_client: Any
) -> None:
    """The writer's connection is killed between two batches: the next write still lands."""
    first, second = new_id(), new_id()

    async def cut_between(writes: LoopWrites) -> list[Any]:
        replies = [await writes.write(_started(backend, first))]
        name = redis_client.client_getname()
        killed = 0
        for client in redis_client.client_list():
            if client["name"] != name and client["cmd"] in ("evalsha", "exec", "multi"):
                killed += redis_client.client_kill_filter(_id=client["id"])
        assert killed >= 1, "the writer's connection was found"
        replies.append(await writes.write(_started(backend, second)))
        return replies

    assert _on_a_loop(backend, cut_between) == [1, 1]
    assert backend.get_task_meta(second)["status"] == states.STARTED
