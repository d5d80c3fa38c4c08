"""The atomic Redis result backend, against this run's real Redis database."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from celery import states
from celery.backends.redis import RedisBackend

from app.core.background import celery_app
from app.core.background.internals.operations.status import get_task_status, record_revoked
from app.core.background.internals.transport.result_backend import (
    AtomicRedisBackend,
    _Store,
    lost_runs,
)
from tests.support.services import Services

pytestmark = pytest.mark.usefixtures("redis_service")


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


def test_writes_sent_together_each_get_their_own_outcome(backend: AtomicRedisBackend) -> None:
    """The asyncio pool's batch: one pipeline, a reply per write, in order."""
    finished, running, fresh = new_id(), new_id(), new_id()
    backend.store_result(finished, "done", states.SUCCESS)
    backend.store_result(running, {"pid": 9}, states.STARTED)
    stores = [_started(backend, finished), _started(backend, running), _started(backend, fresh)]
    # 0: a stored success is kept; 1 + runs lost before: one for the run that never ended.
    assert backend._send_stores(list(stores)) == [0, 2, 1]
    assert backend.get_task_meta(finished)["status"] == states.SUCCESS
    assert backend.get_task_meta(fresh)["status"] == states.STARTED


def test_a_batch_after_redis_lost_its_scripts_is_written_alone(
    backend: AtomicRedisBackend, redis_client: Any
) -> None:
    """NOSCRIPT for every write of the pipeline (a restarted Redis): each is made again alone."""
    backend.store_result(new_id(), None, states.STARTED)  # the script is loaded
    redis_client.script_flush()  # the session's own Redis server (tests/support/services.py)
    ids = [new_id() for _ in range(3)]
    assert backend._send_stores([_started(backend, t) for t in ids]) == [1, 1, 1]
    assert {backend.get_task_meta(t)["status"] for t in ids} == {states.STARTED}
    assert not any(redis_client.exists(f"{backend.get_key_for_task(t).decode()}:lost-runs")
                   for t in ids)  # fmt: skip
