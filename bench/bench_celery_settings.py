"""What splitting one prefork worker into two solo workers gains, in Celery alone.

    .venv/bin/python bench/bench_celery_settings.py [--rounds 3] [--tasks 5000]

No framework code: a bare Celery app (``bench/celery_settings_app.py``) on a
private redis-server, once with Celery's defaults (early acknowledgement, no
result backend) and once with the framework's delivery settings (late
acknowledgement, requeue on a lost worker, prefetch 1, results with STARTED).
For each, one prefork worker with concurrency 2 against two solo workers.
Workers start on a full queue; the rate counts from the first message taken
until nothing is queued or unacknowledged (so a second worker's later start
counts against it). Prints medians with min-max and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.environment import REDIS_HOST, _free_port, _start_redis

TOPOLOGIES = {"1 worker, prefork c=2": ("prefork", 2, 1), "2 workers, solo each": ("solo", 1, 2)}
SETTINGS = ("defaults", "framework")


def start_worker(
    env: dict[str, str], pool: str, concurrency: int, n: int
) -> subprocess.Popen[bytes]:
    celery = str(Path(sys.executable).parent / "celery")
    command = [celery, "-A", "bench.celery_settings_app", "worker", "--pool", pool,
               "--concurrency", str(concurrency), "--hostname", f"raw{n}@%h",
               "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
               "--without-heartbeat"]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def drain_once(
    env: dict[str, str], client: redis.Redis, topology: tuple[str, int, int], tasks: int
) -> float:
    from bench import celery_settings_app

    client.flushall()
    with celery_settings_app.app.connection_for_write() as connection:
        producer = celery_settings_app.app.amqp.Producer(connection)
        for i in range(tasks):
            celery_settings_app.noop.apply_async((i,), producer=producer)
    pool, concurrency, count = topology
    workers = [start_worker(env, pool, concurrency, n) for n in range(count)]
    try:
        started = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            # Celery's default queue is "celery"; the framework's settings use "default".
            left = client.llen("celery") + client.llen("default") + client.hlen("unacked")
            now = time.perf_counter()
            if started is None and left < tasks:
                started, at_start = now, left
            if left == 0 and started is not None:
                return at_start / (now - started)
            time.sleep(0.005)
        raise RuntimeError("queue not drained in 300 s")
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=5000)
    args = parser.parse_args()
    port, folder = _free_port(), tempfile.mkdtemp(prefix="bench-celery-")
    server = _start_redis(port, folder)
    client = redis.Redis(host=REDIS_HOST, port=port)
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for settings in SETTINGS:
            env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
            env.update(
                BENCH_SETTINGS=settings,
                BENCH_BROKER=f"redis://{REDIS_HOST}:{port}/0",
                BENCH_BACKEND=f"redis://{REDIS_HOST}:{port}/1",
                PYTHONPATH=str(Path(__file__).resolve().parents[1]),
            )
            os.environ.update(env)
            sys.modules.pop("bench.celery_settings_app", None)
            for _ in range(args.rounds):
                for label, topology in TOPOLOGIES.items():
                    rate = drain_once(env, client, topology, args.tasks)
                    results.setdefault((settings, label), []).append(rate)
    finally:
        server.terminate()
        server.wait(10)
    print("| settings | topology | median (min-max) tasks/s |\n|---|---|---|")
    for (settings, label), rates in results.items():
        print(f"| {settings} | {label} | {statistics.median(rates):,.0f} "
              f"({min(rates):,.0f}-{max(rates):,.0f}) |")  # fmt: skip
    for settings in SETTINGS:
        one, two = (statistics.median(results[(settings, t)]) for t in TOPOLOGIES)
        print(f"{settings}: 2 solo workers / 1 prefork c=2 = {two / one:.2f}x")


if __name__ == "__main__":
    main()
