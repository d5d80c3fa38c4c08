"""The comparisons. Each runs both (or all) sides in the same run, alternating round by round."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg

from bench import async_mode
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
    """Drain ``count`` tasks per side and round; ``cpu``: task name (or side label) -> CPU µs."""
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
                # ``cpu`` is keyed by task name, or by the side's label where
                # two sides run the same task on different workers.
                key = figure.label if cpu is not None and figure.label in cpu else task_name
                if cpu is not None and key in cpu:
                    cpu[key].values.append((workers.cpu_seconds() - used) / count * 1e6)
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


def database(
    report: Report, services: BenchServices, rounds: int, count: int, async_pool: str | None = None
) -> None:
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
    pool = async_mode.chosen_pool(async_pool, report, "db")
    if pool:
        suite = f"one INSERT per task, {count} tasks, async mode vs scripts/worker.sh, Redis"
        try:
            _against_prefork_in_async_mode(
                report, services, rounds, count, pool, suite,
                "@db_task", "bench.db_insert", lambda i: {"value": f"v{i}"},
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the suite's other figures stand
            report.notes.append(f"{suite} failed: {type(exc).__name__}: {exc}"[:800])


ASYNC_MODE_DRAIN_CONCURRENCY = 16


def _against_prefork_in_async_mode(
    report: Report,
    services: BenchServices,
    rounds: int,
    count: int,
    pool: str,
    suite: str,
    what: str,
    task_name: str,
    make_call: Callable[[int], dict[str, Any]],
    more: list[tuple[str, WorkerSet, str]] | None = None,
) -> list[Figure]:
    """``task_name`` in the async mode against scripts/worker.sh's prefork (issue 14: >= 0.9).

    ``more``: further sides (label, workers, task) drained in the same rounds.
    Returns the figures of the sides: prefork, async mode, then ``more``'s.
    """
    n = ASYNC_MODE_DRAIN_CONCURRENCY
    prefork = WorkerSet(Topology("2 x prefork c=1", "prefork", 1, 2), services.broker_url,
                        services.worker_env())  # fmt: skip
    in_async_mode = WorkerSet(
        async_mode.topology(pool, f"2 x -P custom -c {n}", n),
        services.broker_url, services.worker_env(),
    )  # fmt: skip
    sides = [
        (report.figure(suite, f"{what}, scripts/worker.sh (2 x prefork c=1)", "tasks/s"), prefork),
        (report.figure(suite, f"{what}, async mode (2 x -P custom -c {n})", "tasks/s"),
         in_async_mode),
    ]  # fmt: skip
    cpu = {
        figure.label: report.figure(suite, f"{figure.label}: worker CPU per task", "µs")
        for figure, _ in sides
    }
    drained = [(figure, workers, task_name, make_call) for figure, workers in sides]
    for label, workers, other_task in more or []:
        figure = report.figure(suite, label, "tasks/s")
        cpu[label] = report.figure(suite, f"{label}: worker CPU per task", "µs")
        drained.append((figure, workers, other_task, make_call))
    _drain_rounds(
        services, services.broker_url, drained, count, rounds, redis_backlog(services.broker()),
        cpu=cpu,
    )  # fmt: skip
    report.ratio(suite, "async mode / prefork", sides[1][0], sides[0][0], ">= 0.9")
    prefork_cpu, async_cpu = cpu[sides[0][0].label], cpu[sides[1][0].label]
    report.ratio(suite, "CPU per task: prefork / async mode", prefork_cpu, async_cpu)
    return [figure for figure, *_ in drained]


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


# -- the framework's own cost: against raw Celery in its own workers -------------

# What ``scripts/worker.sh`` starts on Redis: WORKERS (default: one per core)
# workers of prefork c=1, and the same with its options passed through.
WORKER_SH_TOPOLOGIES = [
    Topology("scripts/worker.sh: 2 x prefork c=1", "prefork", 1, 2),
    Topology("WORKERS=1 scripts/worker.sh: 1 x prefork c=1", "prefork", 1, 1),
    Topology("scripts/worker.sh -P solo: 2 x solo", "solo", 1, 2),
    Topology("scripts/worker.sh -P threads: 2 x threads c=1", "threads", 1, 2),
    Topology("scripts/worker.sh -P threads -c 16: 2 x threads c=16", "threads", 16, 2),
]
# On RabbitMQ (or the file broker) scripts/worker.sh starts one prefork worker, c = cores.
RABBITMQ_WORKER_SH = Topology("scripts/worker.sh: 1 x prefork c=2", "prefork", 2, 1)


def _raw_env(services: BenchServices) -> dict[str, str]:
    from app.core.background import celery_app
    from bench.io import raw_celery_env

    return raw_celery_env(services, celery_app, pool_size=5)


def _raw_celery(services: BenchServices) -> Any:
    """The bare Celery app (bench/celery_settings_app.py) in this process, on the bench's Redis."""

    os.environ.update(_raw_env(services))
    from bench import celery_settings_app

    return celery_settings_app


def raw_baseline(
    report: Report,
    services: BenchServices,
    rounds: int,
    count: int,
    calls: int,
    brokers: list[str],
    async_pool: str | None = None,
    only: list[str] | None = None,
) -> None:
    """The framework's no-op against raw Celery's, each in its own workers, per topology.

    Raw Celery is a plain Celery app with the framework's delivery settings
    (``bench/celery_settings_app.py``), started as its own worker processes:
    none of the framework's signals, logging set-up, task classes or result
    backend. On the ``scripts/worker.sh`` topology, three more sides say what
    some of the difference is: the framework's no-op without its time limits,
    raw Celery's with them, and raw Celery's without the STARTED state.
    """
    from bench.io import RAW_APP

    runs = [(t, "redis") for t in WORKER_SH_TOPOLOGIES]
    if "rabbitmq" in brokers and services.vhost is not None:
        runs.append((RABBITMQ_WORKER_SH, "rabbitmq"))
    if only:
        runs = [(t, b) for t, b in runs if any(part in t.label for part in only)]
    for topology, broker in runs:
        url = services.broker_url if broker == "redis" else services.rabbit_url
        if broker == "redis":
            backlog, close = redis_backlog(services.broker()), (lambda: None)
        else:
            backlog, close = rabbit_backlog(url)
        raw_env = {**services.worker_env(url), **_raw_env(services), "BENCH_BROKER": url}
        suite = f"framework vs raw Celery, no-op drain, {count} tasks, {topology.label}, {broker}"
        framework_workers = WorkerSet(topology, url, services.worker_env(url))
        raw_workers = WorkerSet(topology, url, raw_env, app=RAW_APP)
        framework = report.figure(suite, "@simple_task no-op", "tasks/s")
        raw = report.figure(suite, "raw Celery no-op", "tasks/s")
        framework_cpu = report.figure(suite, "@simple_task no-op: worker CPU per task", "µs")
        raw_cpu = report.figure(suite, "raw Celery no-op: worker CPU per task", "µs")
        sides = [
            (framework, framework_workers, "bench.noop", lambda i: {"i": i}),
            (raw, raw_workers, "bench_raw.noop", lambda i: {"i": i}),
        ]
        cpu = {"bench.noop": framework_cpu, "bench_raw.noop": raw_cpu}
        extra: list[tuple[Figure, WorkerSet, str, Callable[[int], dict[str, Any]]]] = []
        if topology is WORKER_SH_TOPOLOGIES[0]:
            extra = [
                (report.figure(suite, "@simple_task no-op, time limits off", "tasks/s"),
                 framework_workers, "bench.noop_unlimited", lambda i: {"i": i}),
                (report.figure(suite, "raw no-op with the framework's time limits", "tasks/s"),
                 raw_workers, "bench_raw.noop_limited", lambda i: {"i": i}),
                (report.figure(suite, "raw no-op without STARTED", "tasks/s"),
                 raw_workers, "bench_raw.noop_unstarted", lambda i: {"i": i}),
            ]  # fmt: skip
        try:
            _drain_rounds(services, url, sides + extra, count, rounds, backlog, cpu=cpu)
        finally:
            close()
        report.ratio(suite, "framework / raw Celery", framework, raw, ">= 0.95")
        report.ratio(suite, "raw CPU / framework CPU per task", raw_cpu, framework_cpu)
        if extra:
            unlimited, raw_limited, unstarted = (side[0] for side in extra)
            report.ratio(suite, "framework / raw, both with time limits", framework, raw_limited)
            report.ratio(suite, "framework / raw, both without time limits", unlimited, raw)
            report.ratio(suite, "raw: with STARTED / without", raw, unstarted)
    if not only or any(part in RAW_ASYNC_MODE_LABEL for part in only):
        pool = async_mode.chosen_pool(async_pool, report, "raw")
        try:
            if pool:
                _noop_in_async_mode(report, services, rounds, count, pool)
        except Exception as exc:  # noqa: BLE001 - .delay()'s cost is still measured
            report.notes.append(
                f"raw, {RAW_ASYNC_MODE_LABEL} failed: {type(exc).__name__}: {exc}"[:800]
            )
    _delay_cost(report, services, rounds, calls)


RAW_ASYNC_MODE_LABEL = f"async mode: 2 x -P custom -c {ASYNC_MODE_DRAIN_CONCURRENCY}"


def _noop_in_async_mode(
    report: Report, services: BenchServices, rounds: int, count: int, pool: str
) -> None:
    """The no-op in the async mode against scripts/worker.sh's prefork, raw Celery for context.

    Raw Celery does not run on the framework's pool: ``-P custom`` would import
    ``app.core.background`` (the framework's app and signals) into its workers.
    Its side here is Celery's own thread pool at the same concurrency, where a
    sync no-op runs as it does in the async mode (in a thread).
    """
    from bench.io import RAW_APP

    n = ASYNC_MODE_DRAIN_CONCURRENCY
    suite = f"framework vs raw Celery, no-op drain, {count} tasks, {RAW_ASYNC_MODE_LABEL}, redis"
    raw_env = {**services.worker_env(), **_raw_env(services)}
    raw_workers = WorkerSet(
        Topology(f"raw 2 x threads c={n}", "threads", n, 2), services.broker_url, raw_env,
        app=RAW_APP,
    )  # fmt: skip
    raw_label = f"raw Celery no-op, 2 x -P threads -c {n}"
    _, in_async_mode, raw = _against_prefork_in_async_mode(
        report, services, rounds, count, pool, suite, "@simple_task no-op", "bench.noop",
        lambda i: {"i": i}, more=[(raw_label, raw_workers, "bench_raw.noop")],
    )  # fmt: skip
    report.ratio(suite, f"async mode / raw Celery -P threads -c {n}", in_async_mode, raw)


def _delay_cost(report: Report, services: BenchServices, rounds: int, count: int) -> None:
    """``.delay()`` on the framework's task against raw Celery's, in this process."""
    from celery import signals

    from app.core.background.celery_app import record_sent
    from bench.tasks import noop

    raw_app = _raw_celery(services)
    suite = f"framework vs raw Celery, .delay() cost, {count} calls, Redis (no worker)"
    broker = services.broker()

    def framework_loop() -> None:
        for i in range(count):
            noop.delay(i=i)

    def without_sent() -> None:
        # The SENT record (a result-backend write per publish) switched off.
        signals.before_task_publish.disconnect(record_sent)
        try:
            framework_loop()
        finally:
            signals.before_task_publish.connect(record_sent)

    def raw_loop() -> None:
        for i in range(count):
            raw_app.noop.delay(i=i)

    sides: list[tuple[Figure, Callable[[], None]]] = [
        (report.figure(suite, "framework .delay()", "µs/call"), framework_loop),
        (report.figure(suite, "framework .delay(), SENT record off", "µs/call"), without_sent),
        (report.figure(suite, "raw Celery .delay()", "µs/call"), raw_loop),
    ]
    # Warm-up: connections and producer pools of both apps.
    for i in range(50):
        noop.delay(i=i)
        raw_app.noop.delay(i=i)
    for round_number in range(rounds):
        turn = round_number % len(sides)
        for figure, run in sides[turn:] + sides[:turn]:
            started = time.perf_counter()
            run()
            figure.values.append((time.perf_counter() - started) / count * 1e6)
            broker.delete("default")
            services.results().flushdb()
    framework, no_sent, raw = (side[0] for side in sides)
    # A cost: the ratio is inverted (raw / framework), so ">= 0.91" is "at most 1.1x".
    report.ratio(
        suite, "raw cost / framework cost (>= 0.91: at most 1.1x)", framework, raw, ">= 0.91"
    )
    report.ratio(suite, "raw cost / framework cost, SENT record off", no_sent, raw)
    report.ratio(suite, "framework cost with SENT / without", no_sent, framework)


def io_sleep(report: Report, services: BenchServices, args: Any) -> None:
    from bench.io import SLEEP, io_job

    io_job(
        report, services, SLEEP, args.rounds, args.io_tasks, pool_size=args.pg_pool,
        max_seconds=args.io_max_seconds, peers=_peers(args), async_pool=args.async_pool,
        only=_split(args.sides),
    )  # fmt: skip


def io_db(report: Report, services: BenchServices, args: Any) -> None:
    from bench.io import PG_SLEEP, io_job

    io_job(
        report, services, PG_SLEEP, args.rounds, args.io_db_tasks, pool_size=args.pg_pool,
        max_seconds=args.io_max_seconds, peers=_peers(args), async_pool=args.async_pool,
        only=_split(args.sides),
    )  # fmt: skip


def _peers(args: Any) -> list[str]:
    return _split(args.peers)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
