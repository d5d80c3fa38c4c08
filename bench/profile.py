"""Where a worker's time goes: py-spy on one pool child draining one task type.

Run: ``python -m bench.profile bench.db_insert`` (needs ``pip install py-spy``
in the venv; py-spy is not a project dependency). Prints the functions with
the most samples (inclusive), for the pool child and the worker's main process.

``python -m bench.profile bench.sleep 5000 --async-mode 100`` profiles the
framework's async mode instead (``-P custom`` with the asyncio pool, one
process at that concurrency): every thread of the one worker process.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench import async_mode
from bench.environment import bench_services

# What py-spy samples: the thread holding the GIL (where CPU goes), or with
# PROFILE_IDLE=1 every thread, idle or not (where time goes: a wait).
PY_SPY_MODE = ("--idle", "--threads") if os.environ.get("PROFILE_IDLE") else ("--gil",)
# The arguments of each queued task, by task name (default: ``{"i": i}``).
CALLS = {
    "bench.db_insert": lambda i: {"value": f"v{i}"},
    "bench.sleep": lambda i: {"seconds": 0.1},
    "bench.pg_sleep": lambda i: {"seconds": 0.05},
}

INTERESTING = ("app/core", "sqlalchemy", "asyncpg", "logging", "structlog", "celery/app/trace",
               "redis/", "prometheus", "json", "event_loop", "asyncio", "billiard/pool.py",
               "kombu/transport")  # fmt: skip


def top(raw: Path, limit: int = 30) -> list[tuple[float, str]]:
    """Inclusive share of samples of the frames worth reading, and the busiest leaves."""
    inclusive: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        frames = stack.split(";")
        leaves["(self) " + frames[-1]] += samples
        for frame in set(frames):
            if any(part in frame for part in INTERESTING):
                inclusive[frame] += samples
    chosen = inclusive.most_common(limit) + leaves.most_common(10)
    return [(100 * n / max(total, 1), f) for f, n in chosen]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", nargs="?", default="bench.db_insert")
    parser.add_argument("count", nargs="?", type=int, default=4000)
    parser.add_argument("--async-mode", type=int, default=0, metavar="CONCURRENCY")
    options = parser.parse_args()
    task, count = options.task, options.count
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with bench_services(rabbitmq=False) as services:
        from bench import suites
        from bench.drain import Topology, WorkerSet, drain, fill, redis_backlog

        suites._create_table(services)
        if options.async_mode:
            topology = async_mode.topology(async_mode.DEFAULT_POOL, "async mode",
                                           options.async_mode, count=1)  # fmt: skip
        else:
            topology = Topology("prefork c=1", "prefork", 1, 1)
        workers = WorkerSet(topology, services.broker_url, services.worker_env()).start()
        try:
            backlog = redis_backlog(services.broker())
            call = CALLS.get(task, lambda i: {"i": i})
            fill(services.broker_url, task, (call(i) for i in range(count)))
            main_pid = workers.workers[0].pid
            profiled = {"main process": main_pid}
            if not options.async_mode:
                children = Path(f"/proc/{main_pid}/task/{main_pid}/children").read_text()
                profiled["pool child"] = int(children.split()[0])
            folder = Path(tempfile.mkdtemp())
            records = {}
            threads = []
            for name, pid in profiled.items():
                out = folder / f"{pid}.txt"
                records[name] = out
                command = [
                    py_spy, "record", "--pid", str(pid), "--duration", "6", "--rate", "200",
                    "--format", "raw", "--output", str(out), "--nonblocking", *PY_SPY_MODE,
                ]  # fmt: skip
                threads.append(threading.Thread(target=subprocess.run, args=(command,),
                                                kwargs={"capture_output": True}))  # fmt: skip
            for thread in threads:
                thread.start()
            rate = drain(workers, backlog, count, timeout=600)
            for thread in threads:
                thread.join()
            print(f"{task}: {rate:.0f} tasks/s with {topology.label} while profiled")
            for name, out in records.items():
                print(f"\n== {name}: % of samples (inclusive)")
                if out.exists():
                    for percent, frame in top(out):
                        print(f"{percent:5.1f}%  {frame[:150]}")
        finally:
            workers.stop()


if __name__ == "__main__":
    main()
