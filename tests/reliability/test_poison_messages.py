"""Poison messages: each is logged with its reason and dropped; the worker keeps consuming.

The messages are published raw (kombu, no Celery client checks): an unknown
task name, a body that is not valid JSON, a call with a missing argument, and
a pickle payload that would create a marker file if it were ever unpickled.
Afterwards a normal task must still complete and the queue must be empty:
under ``acks_late`` an undecodable message must not come back forever.
"""

from __future__ import annotations

import json
import os
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection

from tests.reliability.support import (
    RabbitVhost,
    TaskRun,
    reliability_worker,
    wait_until,
)
from tests.support.db import fetchrow
from tests.support.services import Services

pytestmark = pytest.mark.postgres


def task_headers(name: str) -> dict[str, Any]:
    task_id = str(uuid.uuid4())
    return {
        "lang": "py", "task": name, "id": task_id, "root_id": task_id, "parent_id": None,
        "group": None, "retries": 0, "eta": None, "expires": None, "timelimit": [None, None],
        "argsrepr": "()", "kwargsrepr": "{}", "origin": "poison-test", "ignore_result": True,
    }  # fmt: skip


def json_body(args: list[Any], kwargs: dict[str, Any]) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([args, kwargs, embed]).encode()


class _WouldCreateMarker:
    """Unpickling this runs ``os.system("touch <marker>")``: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def publish_raw(url: str, body: bytes, headers: dict[str, Any], content_type: str) -> None:
    with Connection(url) as connection:
        connection.Producer().publish(
            body,
            exchange="default",
            routing_key="default",
            headers=headers,
            content_type=content_type,
            content_encoding="utf-8" if content_type == "application/json" else "binary",
            delivery_mode=2,
        )


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "redis":
        yield request.getfixturevalue("private_redis").url()
    else:
        vhost: RabbitVhost = request.getfixturevalue("rabbit")
        yield vhost.url


# Its own waits: start 60 + wait_all 60 + 20 + stop 30 = 170 s.
@pytest.mark.timeout(240)
def test_poison_messages_are_logged_dropped_and_the_worker_goes_on(
    completions_db: Services, broker_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    marker = tmp_path / "pickle-was-executed"
    unknown, bad_json, missing, pickled = (task_headers(n) for n in (
        "no.such.task", "reliability.complete", "reliability.needs_two", "reliability.complete",
    ))  # fmt: skip
    backend = completions_db.redis_url
    with reliability_worker(
        broker_url, completions_db.postgres_url, result_backend=backend
    ) as worker:
        publish_raw(broker_url, json_body([], {"key": "x"}), unknown, "application/json")
        publish_raw(broker_url, b'[[], {"key": not json', bad_json, "application/json")
        publish_raw(broker_url, json_body([], {"first": "a"}), missing, "application/json")
        publish_raw(
            broker_url,
            pickle.dumps([[], {"key": "p"}, {}, _WouldCreateMarker(marker)]),
            pickled,
            "application/x-python-serialize",
        )
        # A normal task after the poison: the worker is still consuming.
        run = TaskRun("poison then normal", broker_url, completions_db.postgres_dsn, 5, 0)
        run.send()
        assert run.wait_all(60), worker.log()[-4000:]
        assert wait_until(lambda: missing["id"] in worker.log(), 20)
        log = worker.log()
        assert worker.process is not None
        assert worker.process.poll() is None
    assert not marker.exists(), "a pickle payload was executed"
    if not broker_url.startswith("redis"):
        assert request.getfixturevalue("rabbit").queue_depth("default") == 0
    assert "unregistered task" in log.lower()
    assert "no.such.task" in log
    assert "decode" in log.lower()
    missing_lines = [line for line in log.splitlines() if missing["id"] in line]
    assert any("missing a required argument" in line for line in missing_lines), missing_lines
    assert "x-python-serialize" in log or "pickle" in log.lower()
    # Nothing is waiting or held: no poison message loops or blocks the queue.
    if broker_url.startswith("redis"):
        client = redis.Redis.from_url(broker_url)
        assert client.llen("default") == 0
        assert client.hlen("unacked") == 0
    # Each refused message is a dead letter, addressed by its id, its body kept.
    letters = {h["id"]: dead_letter(completions_db, h["id"]) for h in (unknown, bad_json, missing)}
    assert {letter["reason"] for letter in letters.values()} == {"refused"}
    assert letters[unknown["id"]]["task_name"] == "no.such.task"
    assert letters[unknown["id"]]["arguments_complete"]
    assert not letters[bad_json["id"]]["arguments_complete"]  # undecodable: its raw body
    assert "not json" in letters[bad_json["id"]]["arguments"]
    assert letters[missing["id"]]["error_type"] == "TaskArgumentsRefusedError"
    refused_pickle = dead_letter(completions_db, pickled["id"])
    assert refused_pickle["reason"] == "refused"
    assert not refused_pickle["arguments_complete"]
    for line in log.splitlines():
        if any(word in line for word in ("unregistered", "decode", "Refusing", "missing a")):
            print("[reliability] poison:", line[:300])


def dead_letter(services: Services, task_id: str) -> dict[str, Any]:
    row = fetchrow(services, "SELECT * FROM background_dead_letters WHERE task_id = $1", task_id)
    assert row is not None, f"no dead letter for {task_id}"
    return row
