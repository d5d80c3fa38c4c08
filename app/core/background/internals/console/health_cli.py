"""``python -m app.core.background health api|worker|relay|beat``: one line, exit 0 or 1.

For a systemd ``ExecStartPost=`` (with ``--wait``), a compose ``healthcheck:``
and a Kubernetes exec probe. Without ``--ready`` it checks liveness (the
process is alive and its loop turns: restart it if not); with ``--ready``,
readiness (it can do its work: the services it needs answer). Per type:

========  =====================================================  ==========================
type      liveness                                               readiness
========  =====================================================  ==========================
api       answers ``GET /ready`` at all (any status)             ``GET /ready`` is 200
worker    its heartbeat is fresh, or it answers a ping           it answers a ping (through
                                                                 the broker) and the
                                                                 database answers
relay     its heartbeat file is fresh (touched every pass)       live, database and broker
beat      its heartbeat file is fresh (touched every tick)       live, and the broker
========  =====================================================  ==========================
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from celery import Celery
from celery.utils.nodenames import host_format

from ..operations import health
from ..operations.health import Verdict, guarded
from ..operations.heartbeat_file import BEAT_FILE, RELAY_FILE

PROCESS_TYPES = ("api", "worker", "relay", "beat")
# A worker beats every 10 s (running.HEARTBEAT_INTERVAL): three missed, it is gone.
WORKER_MAX_AGE = 30.0
# beat ticks at least every 10 s; the relay turns every --interval (1 s), but a pass
# on a database that does not answer waits out its 30 s connect timeout first.
MAX_AGES = {"worker": WORKER_MAX_AGE, "beat": 30.0, "relay": 60.0}


@dataclass(frozen=True)
class HealthContext:
    """What the checks need from the settings, and the Celery app (built on first use)."""

    database_url: str
    heartbeat_dir: Path
    celery_app: Callable[[], Celery]


def add_commands(commands: Any, handler: Callable[[argparse.Namespace], int]) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "health",
        help="liveness (default) or readiness (--ready) of a process: exit 0 or 1",
        description="Check one process type; print one line (ok: or fail: and why) and "
        "exit 0 (passed) or 1 (failed). Without --ready: liveness (alive, its loop "
        "turns); with --ready: readiness (the services it needs answer).",
    )
    parser.add_argument("process", choices=PROCESS_TYPES)
    parser.add_argument("--ready", action="store_true", help="readiness instead of liveness")
    parser.add_argument(
        "--hostname", help="worker: its --hostname (%%h, %%n, %%d expanded as Celery does)"
    )
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="api: its base URL (default: %(default)s)"
    )
    parser.add_argument(
        "--max-age",
        type=float,
        default=None,
        help="worker, relay, beat: oldest heartbeat that passes, in seconds "
        f"(default: {', '.join(f'{k} {v:g}' for k, v in MAX_AGES.items())})",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds each round trip may take"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="check again every second until it passes or this many seconds have passed "
        "(systemd ExecStartPost: the process has just been started)",
    )
    parser.set_defaults(handler=handler)


def run(args: argparse.Namespace, context: HealthContext, out: TextIO) -> int:
    if args.process == "worker" and not args.hostname:
        print("fail: health worker needs --hostname (the worker's own)", file=out)
        return 1
    check = _check_for(args, context)
    verdict = health.wait_for_verdict(check, args.wait) if args.wait > 0 else check()
    print(f"{'ok' if verdict.ok else 'fail'}: {verdict.reason}", file=out)
    return 0 if verdict.ok else 1


def _check_for(args: argparse.Namespace, context: HealthContext) -> Callable[[], Verdict]:
    timeout: float = args.timeout
    max_age: float = args.max_age if args.max_age is not None else MAX_AGES.get(args.process, 0)
    if args.process == "api":
        return lambda: _api(args.url.rstrip("/") + "/ready", args.ready, timeout)
    if args.process == "worker":
        hostname = host_format(args.hostname)
        return lambda: _worker(context, hostname, args.ready, max_age, timeout)
    name = args.process
    path = context.heartbeat_dir / (RELAY_FILE if name == "relay" else BEAT_FILE)
    return lambda: _file_process(context, name, path, args.ready, max_age, timeout)


def _api(url: str, ready: bool, timeout: float) -> Verdict:
    def check() -> Verdict:
        status = health.http_status(url, timeout)
        if ready:
            return Verdict(status == 200, f"api: GET {url} answered {status}")
        # Any answer, 503 included: the process serves requests. Whether the services
        # behind it answer is readiness, and must not get the API restarted.
        return Verdict(True, f"api: answers (GET {url}: {status})")

    return guarded("api", check)


def _worker(
    context: HealthContext, hostname: str, ready: bool, max_age: float, timeout: float
) -> Verdict:
    app = context.celery_app()

    def ping() -> Verdict:
        return guarded("worker", lambda: health.worker_ping(app, hostname, timeout))

    if ready:
        pinged = ping()
        return _all(pinged, _database(context, timeout)) if pinged.ok else pinged
    beat = guarded("worker", lambda: health.worker_heartbeat(app, hostname, max_age))
    if beat.ok:
        return beat
    # No fresh heartbeat (or a result backend that keeps none): a ping decides.
    pinged = ping()
    return pinged if pinged.ok else Verdict(False, f"{beat.reason}; {pinged.reason}")


def _file_process(
    context: HealthContext, name: str, path: Path, ready: bool, max_age: float, timeout: float
) -> Verdict:
    alive = health.file_heartbeat(path, max_age, name)
    if not ready or not alive.ok:
        return alive
    app = context.celery_app()
    broker = guarded("broker", lambda: health.broker_connects(app, timeout))
    if name == "beat":
        return _all(alive, broker)
    return _all(alive, _database(context, timeout), broker)


def _database(context: HealthContext, timeout: float) -> Verdict:
    return guarded("database", lambda: health.database_answers(context.database_url, timeout))


def _all(*verdicts: Verdict) -> Verdict:
    failed = [verdict for verdict in verdicts if not verdict.ok]
    return Verdict(not failed, "; ".join(v.reason for v in (failed or list(verdicts))))
