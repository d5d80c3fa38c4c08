"""Run the benchmarks: ``python -m bench`` (or ``bench/run.sh``).

Prints a table (median and min-max over the rounds, ratios with their
targets) and writes bench/RESULTS.md. ``--only`` picks suites, ``--rounds``
and ``--tasks`` trade precision for time.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from typing import Any

from bench import async_mode

SUITES = ("throughput", "db", "dispatch", "topology", "raw", "io", "io_db", "admission")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default=",".join(SUITES), help=f"any of {', '.join(SUITES)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per drain (no-op)")
    parser.add_argument("--topology-tasks", type=int, default=3000, help="tasks per drain")
    parser.add_argument("--db-tasks", type=int, default=1000, help="tasks per drain (INSERT)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per dispatch round")
    parser.add_argument("--brokers", default="redis,rabbitmq")
    parser.add_argument("--raw-tasks", type=int, default=3000, help="tasks per drain (raw)")
    parser.add_argument("--io-tasks", type=int, default=5000, help="tasks per drain (io)")
    parser.add_argument("--io-db-tasks", type=int, default=2000, help="tasks per drain (io_db)")
    parser.add_argument(
        "--io-max-seconds", type=float, default=25.0,
        help="io, io_db: a side drains at most this many seconds' worth at its ceiling",
    )  # fmt: skip
    parser.add_argument(
        "--pg-pool", type=int, default=20, help="io_db: engine pool size per process (+10 overflow)"
    )
    parser.add_argument(
        "--peers", default="taskiq,saq,dramatiq", help="io, io_db: async-native peers"
    )
    parser.add_argument(
        "--sides", default="",
        help="raw (topologies), io, io_db: only the sides whose label contains one of these"
        " (comma-separated); admission: check, drain, fairness",
    )  # fmt: skip
    parser.add_argument(
        "--async-pool", default=async_mode.DEFAULT_POOL,
        help="db, raw, io, io_db: the framework's async mode, -P custom with this pool"
        " (module:Class, CELERY_CUSTOM_WORKER_POOL); skipped with a note where it does"
        " not import; 'none' leaves it out (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    parser.add_argument(
        "--output", default=None, metavar="PATH",
        help="write the results here instead of bench/RESULTS.md (a run of some suites)",
    )  # fmt: skip
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(SUITES)
    if unknown:
        parser.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    # SIGTERM unwinds like Ctrl-C: workers stopped, database and vhost removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from bench.environment import bench_services

    rabbitmq = bool({"topology", "raw"} & set(chosen)) and "rabbitmq" in brokers
    with bench_services(rabbitmq=rabbitmq) as services:
        # Imported only now: the app reads the environment set up above.
        from bench import suites
        from bench.report import Report, machine, write_results

        machine_lines = machine()
        report = Report()
        started = time.monotonic()
        for name in chosen:
            print(f"== {name} ...", flush=True)
            try:
                run_suite(name, suites, report, services, args, brokers)
            except Exception as exc:  # noqa: BLE001 - one failing suite must not lose the others
                report.notes.append(f"suite {name} failed: {type(exc).__name__}: {exc}")
            print(report.table(), flush=True)
        report.notes.append(f"total run time {time.monotonic() - started:.0f}s")
        print("\n".join(f"- {note}" for note in report.notes))
        print("\n".join(machine_lines))
        if not args.no_write:
            command = "python -m bench " + shlex.join(sys.argv[1:])
            write_results(report, command.strip(), machine_lines, args.output)
            print(f"written {args.output or 'bench/RESULTS.md'}")


def run_suite(
    name: str,
    suites: Any,
    report: Any,
    services: Any,
    args: argparse.Namespace,
    brokers: list[str],
) -> None:
    if name == "throughput":
        suites.throughput(report, services, args.rounds, args.tasks)
    elif name == "db":
        suites.database(report, services, args.rounds, args.db_tasks, args.async_pool)
    elif name == "dispatch":
        suites.dispatch(report, services, args.rounds, args.calls)
    elif name == "topology":
        suites.topology(report, services, args.rounds, args.topology_tasks, brokers)
    elif name == "raw":
        only = [part.strip() for part in args.sides.split(",") if part.strip()]
        suites.raw_baseline(
            report, services, args.rounds, args.raw_tasks, args.calls, brokers, args.async_pool,
            only,
        )  # fmt: skip
    elif name == "io":
        suites.io_sleep(report, services, args)
    elif name == "io_db":
        suites.io_db(report, services, args)
    elif name == "admission":
        from bench.admission import admission

        only = [part.strip() for part in args.sides.split(",") if part.strip()]
        admission(report, services, args.rounds, args.tasks, only)


if __name__ == "__main__":
    main()
