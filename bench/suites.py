"""The comparisons. Each runs both (or all) sides in the same run, alternating round by round."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg

from bench.drain import Topology, WorkerSet, drain, fill, rabbit_backlog, redis_backlog
from bench.environment import BenchServices
from bench.report import Figure, Report

WARM_UP = 100


def _drain_rounds(
    services: BenchServices,
    broker_url: str,
    sides: list[tuple[Figure, WorkerSet, str, Callable[[int], dict[str, Any]]]],
    count: int,
    rounds: int,
    backlog: Callable[[], int],
    cpu: dict[str, Figure] | None = None,
) -> None:
    """Drain ``count`` tasks per side and round; ``cpu``: task name -> CPU µs per task figure."""
    for worker_set in {id(s[1]): s[1] for s in sides}.values():
        worker_set.start()
    try:
        # Warm-up, not measured: first connections, engines, pools, imports.
        for _figure, workers, task_name, make_call in sides:
            fill(broker_url, task_name, (make_call(i) for i in range(WARM_UP)))
            drain(workers, backlog, WARM_UP, timeout=300)
        services.results().flushdb()
        for round_number in range(rounds):
            # Each round starts with the next side: no side always goes first.
            turn = round_number % len(sides)
            for figure, workers, task_name, make_call in sides[turn:] + sides[:turn]:
                fill(broker_url, task_name, (make_call(i) for i in range(count)))
                used = workers.cpu_seconds()
                figure.values.append(drain(workers, backlog, count, timeout=600))
                if cpu is not None and task_name in cpu:
                    cpu[task_name].values.append((workers.cpu_seconds() - used) / count * 1e6)
                services.results().flushdb()
    finally:
        for worker_set in {id(s[1]): s[1] for s in sides}.values():
            worker_set.stop()


def throughput(report: Report, services: BenchServices, rounds: int, count: int) -> None:
    """No-op @simple_task vs a raw @celery_app.task no-op, prefork c=2, Redis."""
    suite = f"no-op drain, {count} tasks, prefork c=2, Redis"
    framework = report.figure(suite, "@simple_task no-op", "tasks/s")
    raw = report.figure(suite, "raw @celery_app.task no-op", "tasks/s")
    # Where the difference comes from: the framework's default time limits
    # (the `standard` policy's) make billiard track a timer per task in the
    # worker's main process. The same no-op with and without them, both sides.
    unlimited = report.figure(suite, "@simple_task no-op, time limits off", "tasks/s")
    raw_limited = report.figure(suite, "raw no-op with the same time limits", "tasks/s")
    # The workers' CPU time per task: what each side costs, whatever else the
    # machine does meanwhile (drain rates on this shared VM vary by more than 5%).
    framework_cpu = report.figure(suite, "@simple_task no-op: worker CPU per task", "µs")
    raw_cpu = report.figure(suite, "raw no-op: worker CPU per task", "µs")
    # One set of workers runs every side, in turn: with a set per side, the
    # two sets differed from each other by more than the effect measured.
    workers = WorkerSet(Topology("prefork c=2"), services.broker_url, services.worker_env())
    _drain_rounds(
        services, services.broker_url,
        [(framework, workers, "bench.noop", lambda i: {"i": i}),
         (raw, workers, "bench.raw_noop", lambda i: {"i": i}),
         (unlimited, workers, "bench.noop_unlimited", lambda i: {"i": i}),
         (raw_limited, workers, "bench.raw_noop_limited", lambda i: {"i": i})],
        count, rounds, redis_backlog(services.broker()),
        cpu={"bench.noop": framework_cpu, "bench.raw_noop": raw_cpu},
    )  # fmt: skip
    report.ratio(suite, "framework / raw", framework, raw, ">= 0.95")
    report.ratio(suite, "raw CPU / framework CPU per task", raw_cpu, framework_cpu)
    report.ratio(suite, "framework / raw, both with time limits", framework, raw_limited, "")
    report.ratio(suite, "framework / raw, both without time limits", unlimited, raw, "")


def _create_table(services: BenchServices) -> None:
    from bench.tasks import CREATE_TABLE

    async def create() -> None:
        connection = await asyncpg.connect(services.dsn)
        try:
            await connection.execute(CREATE_TABLE)
        finally:
            await connection.close()

    asyncio.run(create())


def database(report: Report, services: BenchServices, rounds: int, count: int) -> None:
    """@db_task one INSERT vs (a) naive, (b) hand-tuned raw, and raw asyncpg."""
    _create_table(services)
    suite = f"one INSERT per task, {count} tasks, prefork c=2, Redis, PostgreSQL"
    # The same workers run every side in turn (see ``throughput``).
    workers = WorkerSet(Topology("prefork"), services.broker_url, services.worker_env())
    sides = [
        (report.figure(suite, name, "tasks/s"), workers, task)
        for name, task in (
            ("@db_task via ctx.session", "bench.db_insert"),
            ("(a) naive: asyncio.run + engine per task", "bench.naive_insert"),
            ("(b) hand-tuned raw Celery + pooled AsyncSession", "bench.tuned_insert"),
            ("raw asyncpg on a persistent loop", "bench.asyncpg_insert"),
        )
    ]  # fmt: skip
    framework_cpu = report.figure(suite, "@db_task: worker CPU per task", "µs")
    tuned_cpu = report.figure(suite, "(b) hand-tuned: worker CPU per task", "µs")
    _drain_rounds(
        services, services.broker_url,
        [(figure, workers, task, lambda i: {"value": f"v{i}"}) for figure, workers, task in sides],
        count, rounds, redis_backlog(services.broker()),
        cpu={"bench.db_insert": framework_cpu, "bench.tuned_insert": tuned_cpu},
    )  # fmt: skip
    report.ratio(suite, "(b) CPU / @db_task CPU per task", tuned_cpu, framework_cpu)
    framework, naive, tuned, raw_asyncpg = (side[0] for side in sides)
    report.ratio(suite, "@db_task / (a) naive", framework, naive, ">= 4")
    report.ratio(suite, "@db_task / (b) hand-tuned", framework, tuned, ">= 0.9")
    report.ratio(suite, "(b) hand-tuned / raw asyncpg", tuned, raw_asyncpg)


def dispatch(report: Report, services: BenchServices, rounds: int, count: int) -> None:
    """Client side cost per dispatched message (no worker: the queue is emptied after)."""
    from bench.tasks import noop

    suite = f"dispatch, {count} calls, Redis (no worker)"
    broker = services.broker()
    payload = b"x" * 900  # about the size of one task message

    def delay_loop() -> None:
        for i in range(count):
            noop.delay(i=i)

    def dedup_loop() -> None:
        for i in range(count):
            noop.apply_async(kwargs={"i": i}, task_id=f"bench-{uuid.uuid4().hex}")

    def bulk() -> None:
        noop.delay_many([{"i": i} for i in range(count)])

    def raw_lpush() -> None:
        for _ in range(count):
            broker.lpush("bench-raw", payload)

    sides: list[tuple[Figure, Callable[[], None]]] = [
        (report.figure(suite, "plain .delay() per call", "µs/call"), delay_loop),
        (report.figure(suite, "deduplicated .apply_async(task_id=...)", "µs/call"), dedup_loop),
        (report.figure(suite, "task.delay_many(list) bulk", "µs/call"), bulk),
        (report.figure(suite, "raw redis LPUSH per call (floor)", "µs/call"), raw_lpush),
    ]
    for _ in range(rounds):
        for figure, run in sides:
            started = time.perf_counter()
            run()
            figure.values.append((time.perf_counter() - started) / count * 1e6)
            # Only the messages: flushing the database would also drop kombu's
            # exchange bindings, and with them remote control (add_consumer).
            broker.delete("default", "bench-raw")
            services.results().flushdb()
    plain, dedup, bulk_figure, _ = (side[0] for side in sides)
    report.ratio(suite, "delay_many / .delay() loop (throughput)", bulk_figure, plain, ">= 2.5")
    report.ratio(suite, "dedup / plain (throughput)", dedup, plain)


TOPOLOGIES = [
    Topology("1 worker, prefork c=2 (default)", "prefork", 2, 1),
    Topology("2 workers, prefork c=1 each (scripts/worker.sh)", "prefork", 1, 2),
    Topology("2 workers, solo each", "solo", 1, 2),
    Topology("1 worker, threads c=2", "threads", 2, 1),
]


def topology(
    report: Report, services: BenchServices, rounds: int, count: int, brokers: list[str]
) -> None:
    """Worker topologies for the framework's no-op task, on Redis and on RabbitMQ.

    Raw Celery's no-op runs on the same workers, alternating with the
    framework's: what a topology gains with these delivery settings is
    Celery's, not the framework's.
    """
    for broker in brokers:
        if broker == "rabbitmq" and services.vhost is None:
            report.notes.append("RabbitMQ topology skipped: rabbitmqctl not available")
            continue
        url = services.broker_url if broker == "redis" else services.rabbit_url
        suite = f"worker topology, {count} no-op tasks, {broker}"
        env = services.worker_env(url)
        topologies = TOPOLOGIES
        if broker == "rabbitmq":
            # Solo workers on RabbitMQ fell to one message per ~2 s after the
            # first cancel_consumer/add_consumer cycle, raw Celery's as well
            # (16-44 tasks/s after a first round at 973-1,000): the rounds
            # would measure that stall, and take minutes each.
            topologies = [t for t in TOPOLOGIES if t.pool != "solo"]
            report.notes.append(
                "RabbitMQ: solo workers not measured (they stall after a consumer "
                "cancel/add cycle, raw Celery too; see README)"
            )
        sides = [
            (
                report.figure(suite, t.label, "tasks/s"),
                report.figure(suite, f"raw Celery, {t.label}", "tasks/s"),
                WorkerSet(t, url, env),
            )
            for t in topologies
        ]
        if broker == "redis":
            backlog, close = redis_backlog(services.broker()), (lambda: None)
        else:
            backlog, close = rabbit_backlog(url)
        try:
            # One set of workers at a time: with every topology's workers up at
            # once, idle workers cost CPU and broadcast replies went missing.
            for framework, raw, workers in sides:
                _drain_rounds(
                    services, url,
                    [(framework, workers, "bench.noop", lambda i: {"i": i}),
                     (raw, workers, "bench.raw_noop", lambda i: {"i": i})],
                    count, rounds, backlog,
                )  # fmt: skip
        finally:
            close()
        default, raw_default, _ = sides[0]
        for framework, raw, _ in sides[1:]:
            recommended = "worker.sh" in framework.label
            target = ">= 2" if broker == "redis" and recommended else ""
            report.ratio(suite, f"{framework.label} / default", framework, default, target)
            report.ratio(suite, f"raw Celery: {framework.label} / default", raw, raw_default)
