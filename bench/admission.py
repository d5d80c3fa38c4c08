"""Task limits (issue 16): what a check costs, what it does to a drain, and fairness.

- the check itself, per call, against the bench's own Redis (the store the
  workers use: the broker's): a rate token; a slot taken and given back;
- the no-op drain (prefork c=2, Redis) of a task whose limit is far above
  the load, against the same no-op without one, same workers, rounds taking
  turns. Target: at least 0.9x;
- fairness: 10,000 runs of one tenant queued, then 10 of another, each
  tenant capped at 3 at once, on 2 workers x 2 processes (``scripts/worker.sh``)
  and on 2 asyncio-pool workers x 50. The small tenant's runs finish when the
  workers have reached them once (the consumer sends each of the big tenant's
  runs that must wait back, a millisecond or so, no pool slot), not after the
  big backlog.
"""

from __future__ import annotations

import time
import timeit
import uuid
from typing import Any

from bench import async_mode
from bench.drain import Topology, WorkerSet, fill, redis_backlog
from bench.environment import BenchServices
from bench.report import Report

FAIRNESS_BIG, FAIRNESS_SMALL, FAIRNESS_SECONDS = 10_000, 10, 0.05


def admission(
    report: Report, services: BenchServices, rounds: int, count: int, only: list[str]
) -> None:
    """Every part, or those named in ``only`` (``check``, ``drain``, ``fairness``)."""

    def wanted(part: str) -> bool:
        return not only or part in only

    if wanted("check"):
        check_cost(report, services, rounds)
    if wanted("drain"):
        drain_cost(report, services, rounds, count)
    if wanted("fairness"):
        fairness(report, services, Topology("2 x prefork c=2 (scripts/worker.sh)", count=2))
        fairness(
            report,
            services,
            async_mode.topology(async_mode.DEFAULT_POOL, "2 x asyncio pool c=50", 50),
        )


def check_cost(report: Report, services: BenchServices, rounds: int, calls: int = 2000) -> None:
    from app.core.background.internals.admission.limits import parse_rate
    from app.core.background.internals.admission.stores import RedisAdmissionStore

    suite = "limit check per run, Redis (the broker's)"
    store = RedisAdmissionStore(services.broker_url)
    rate = parse_rate("bench", "1000000/s")
    scope = f"bench:{uuid.uuid4().hex}"
    token = report.figure(suite, "rate token (one script)", "µs")
    slot = report.figure(suite, "slot taken and given back (two scripts)", "µs")
    ping = report.figure(suite, "Redis PING round trip, for scale", "µs")
    client: Any = store._script("take_token").registered_client

    def take_and_give_back() -> None:
        store.take_slot(scope, "holder", 100_000, 30.0, 300.0)
        store.release_slot(scope, "holder", 0.001)

    for _ in range(rounds):
        token.values.append(
            timeit.timeit(lambda: store.take_token(scope, rate, 300.0), number=calls) / calls * 1e6
        )
        slot.values.append(timeit.timeit(take_and_give_back, number=calls) / calls * 1e6)
        ping.values.append(timeit.timeit(client.ping, number=calls) / calls * 1e6)


def drain_cost(report: Report, services: BenchServices, rounds: int, count: int) -> None:
    from bench.suites import _drain_rounds

    suite = f"no-op drain under a limit far above the load, {count} tasks, prefork c=2, Redis"
    plain = report.figure(suite, "@simple_task no-op", "tasks/s")
    rated = report.figure(suite, 'no-op, rate_limit="1000000/s"', "tasks/s")
    capped = report.figure(suite, "no-op, concurrency=100000 per key (16 keys)", "tasks/s")
    plain_cpu = report.figure(suite, "no-op: worker CPU per task", "µs")
    rated_cpu = report.figure(suite, "rate-limited no-op: worker CPU per task", "µs")
    capped_cpu = report.figure(suite, "capped no-op: worker CPU per task", "µs")
    workers = WorkerSet(Topology("prefork c=2"), services.broker_url, services.worker_env())
    _drain_rounds(
        services, services.broker_url,
        [(plain, workers, "bench.noop", lambda i: {"i": i}),
         (rated, workers, "bench.noop_rate_limited", lambda i: {"i": i}),
         (capped, workers, "bench.noop_capped", lambda i: {"i": i})],
        count, rounds, redis_backlog(services.broker()),
        cpu={"bench.noop": plain_cpu, "bench.noop_rate_limited": rated_cpu,
             "bench.noop_capped": capped_cpu},
    )  # fmt: skip
    report.ratio(suite, "rate-limited / plain", rated, plain, ">= 0.9")
    report.ratio(suite, "capped / plain", capped, plain, ">= 0.9")


def fairness(report: Report, services: BenchServices, topology: Topology) -> None:
    suite = (
        f"fairness: {FAIRNESS_BIG:,} runs of tenant 'big' queued, then {FAIRNESS_SMALL} of "
        f"'small'; concurrency=3 per tenant, {FAIRNESS_SECONDS * 1000:.0f} ms each, "
        f"{topology.label}"
    )
    small_done = report.figure(suite, "last 'small' run done, after the start", "s")
    big_done = report.figure(suite, "last 'big' run done, after the start", "s")
    floor = report.figure(suite, "the big backlog at 3 at once, at best", "s")
    broker = services.broker()
    workers = WorkerSet(topology, services.broker_url, services.worker_env())
    workers.start()
    try:
        calls = [{"tenant": "big", "seconds": FAIRNESS_SECONDS}] * FAIRNESS_BIG
        calls += [{"tenant": "small", "seconds": FAIRNESS_SECONDS}] * FAIRNESS_SMALL
        fill(services.broker_url, "bench.tenant_job", calls)
        started = time.time()
        workers.consume()
        deadline = time.monotonic() + 900
        while broker.llen("fair:big") < FAIRNESS_BIG or broker.llen("fair:small") < FAIRNESS_SMALL:
            if time.monotonic() > deadline:
                raise RuntimeError("the fairness run did not finish in 900 s")
            time.sleep(0.2)
        small_done.values.append(
            max(float(t) for t in broker.lrange("fair:small", 0, -1)) - started
        )
        big_done.values.append(max(float(t) for t in broker.lrange("fair:big", 0, -1)) - started)
        floor.values.append(FAIRNESS_BIG * FAIRNESS_SECONDS / 3)
        deferrals = sum(w.log().count("Task waiting for its limit") for w in workers.workers)
        report.notes.append(
            f"fairness, {topology.label}: {deferrals:,} deferrals for "
            f"{FAIRNESS_BIG + FAIRNESS_SMALL:,} runs"
        )
    finally:
        workers.stop()
        broker.delete("fair:big", "fair:small")
    report.ratio(suite, "big backlog done / small tenant done", big_done, small_done)
