"""Command-line tools: ``python -m app.core.background <command>``.

Commands:
  watch TASK_ID   live progress of a task until it ends, then its result or error
  relay           send the transactional outbox's pending tasks (--once: drain and exit)
  dead-letters    tasks that failed for good: list, show, replay, purge
  health TYPE     liveness (or --ready: readiness) of an api, worker, relay or beat: exit 0/1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any


def _watch(args: argparse.Namespace) -> int:
    # Imported here: building the Celery app reads the settings.
    from .celery_app import celery_app
    from .internals.operations.status import TaskStatus, get_task_status
    from .internals.operations.watch import watch

    def fetch() -> TaskStatus:
        # The API's own reading: the same states, the same "unknown" (its 404).
        return get_task_status(celery_app, args.task_id)

    live = args.live if args.live is not None else sys.stdout.isatty()
    try:
        return watch(
            fetch,
            sys.stdout,
            interval=args.interval,
            timeout=args.timeout,
            unknown_timeout=args.unknown_timeout,
            live=live,
            err=sys.stderr,
        )
    except KeyboardInterrupt:
        print()
        return 130


def _relay(args: argparse.Namespace) -> int:
    from app.core.config import get_settings

    from .celery_app import celery_app, tracing_config
    from .internals.delivery.outbox import serve_relay
    from .internals.logging import configure_logging
    from .internals.observability.tracing import Tracing, start_tracing

    settings = get_settings()
    # The worker's log format and masking (URL passwords, row values) for the
    # relay's lines too; without it Python prints bare warnings.
    configure_logging(
        settings.log_format,
        settings.log_level,
        log_task_arguments=settings.background_log_task_arguments,
        trace_ids=settings.tracing_enabled,
    )
    # Tracing on: each row is sent in the trace of the call that wrote it.
    tracing: Tracing | None = None
    if settings.tracing_enabled:
        tracing = start_tracing(tracing_config(settings, "relay"))
    try:
        return _run_relay(args, settings, celery_app, serve_relay)
    finally:
        if tracing is not None:
            tracing.shutdown()


def _run_relay(args: argparse.Namespace, settings: Any, celery_app: Any, serve_relay: Any) -> int:
    import asyncio

    from .internals.operations.heartbeat_file import RELAY_FILE, FileHeartbeat

    # Touched before every pass (its liveness: ``health relay``), removed at the end.
    heartbeat = FileHeartbeat(settings.heartbeat_dir / RELAY_FILE)

    async def serve() -> int:
        import signal

        import anyio

        # SIGTERM (systemd, docker stop, Kubernetes) and Ctrl-C: finish the pass in
        # progress, so that no row is sent and left unmarked (sent again), then exit 0.
        stop = anyio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        return int(
            await serve_relay(
                settings.database_url,
                celery_app,
                interval=args.interval,
                batch_size=args.batch_size,
                once=args.once,
                stop=stop,
                on_turn=heartbeat.beat,
            )
        )

    try:
        sent = asyncio.run(serve())
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's answer: the reason, and a failing status
        print(f"relay: not every pending task was sent: {exc}", file=sys.stderr)
        return 1
    finally:
        heartbeat.remove()
    print(f"relayed {sent} task(s)")
    return 0


def _health(args: argparse.Namespace) -> int:
    from app.core.config import get_settings

    from .internals.console.health_cli import HealthContext, run

    settings = get_settings()

    def celery_app() -> Any:
        # Imported when a check needs it: building the app reads the settings, and
        # ``health api`` or a heartbeat file needs none of it.
        from .celery_app import celery_app

        return celery_app

    context = HealthContext(settings.database_url, settings.heartbeat_dir, celery_app)
    return run(args, context, sys.stdout)


def _dead_letters(args: argparse.Namespace) -> int:
    import asyncio

    from app.core.config import get_settings

    # Imported here: building the Celery app reads the settings.
    from .celery_app import celery_app
    from .internals.console import dead_letter_cli
    from .internals.session import DatabaseConfig, create_engine

    for module in filter(None, (name.strip() for name in args.include.split(","))):
        celery_app.loader.import_task_module(module)
    engine = create_engine(DatabaseConfig(url=get_settings().database_url))
    try:
        return asyncio.run(dead_letter_cli.run(args, engine, celery_app, sys.stdout))
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    from .internals.operations.watch import UNKNOWN_TIMEOUT

    parser = argparse.ArgumentParser(
        prog="python -m app.core.background", description="Background task tools."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    watch = commands.add_parser(
        "watch",
        help="show a task's progress until it ends",
        description="Show a live progress bar for a task until it ends, then print its "
        "result (exit 0) or its error (exit 1). Exit 2 if --timeout passes first, 3 if "
        "the id is still unknown (GET /tasks/ID answers 404) after --unknown-timeout.",
    )
    watch.add_argument("task_id", metavar="TASK_ID")
    watch.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    watch.add_argument("--timeout", type=float, default=None, help="give up after this long")
    watch.add_argument(
        "--unknown-timeout",
        type=float,
        default=UNKNOWN_TIMEOUT,
        help="seconds an unknown id may take to appear (an outbox task before the relay)",
    )
    watch.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="redraw one line in place (default: when stdout is a terminal)",
    )
    watch.set_defaults(handler=_watch)
    relay = commands.add_parser(
        "relay",
        help="send the outbox's pending tasks",
        description="Send the tasks written with delay_via_outbox, in order, and mark them "
        "sent. Several relays may run at once on PostgreSQL (rows are locked SKIP LOCKED).",
    )
    relay.add_argument("--once", action="store_true", help="send what is pending, then exit")
    relay.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    relay.add_argument("--batch-size", type=int, default=100, help="rows per transaction")
    relay.set_defaults(handler=_relay)
    from .internals.console.dead_letter_cli import add_commands

    add_commands(commands, handler=_dead_letters)
    from .internals.console.health_cli import add_commands as add_health_command

    add_health_command(commands, handler=_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
