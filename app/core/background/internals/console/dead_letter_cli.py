"""``python -m app.core.background dead-letters list|show|replay|purge``.

The commands read and change the dead letters table through
``DeadLetterStore`` and ``replay``, the same code the operations router
uses. Exit status: 0 when the command did what it says, 1 when it did not
(an unknown id, nothing sent, nothing matched), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from celery import Celery
from sqlalchemy.ext.asyncio import AsyncEngine

from ..operations.dead_letters import DeadLetter, DeadLetterFilter, DeadLetterStore
from .replay import replay, replay_where

# How much of the arguments and traceback `show` prints unless --full.
SHOWN_CHARS = 20_000


def add_commands(
    commands: Any, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """The ``dead-letters`` command and its subcommands, on the CLI's subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "dead-letters",
        help="tasks that failed for good: list, show, replay, purge",
        description="Tasks that failed for good (non-retriable error, retries exhausted, "
        "worker lost, time limit, refused message), kept in the application database.",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = sub.add_parser("list", help="the newest dead letters, or --groups")
    _filters(listing)
    listing.add_argument("--groups", action="store_true", help="counts by task and error")
    listing.add_argument("--limit", type=int, default=50, help="rows to print (newest first)")
    listing.add_argument("--offset", type=int, default=0)

    show = sub.add_parser("show", help="one dead letter: error, traceback and arguments")
    show.add_argument("task_id", metavar="TASK_ID")
    show.add_argument("--full", action="store_true", help="do not cut long arguments")

    again = sub.add_parser(
        "replay",
        help="send again: TASK_ID, or every one a filter matches",
        description="Send dead letters again through the task's send path. Exit 1 when "
        "nothing was sent (unknown id, already replayed, task no longer registered).",
    )
    again.add_argument("task_id", metavar="TASK_ID", nargs="?")
    _filters(again)
    again.add_argument(
        "-I",
        "--include",
        default="",
        metavar="MODULES",
        help="comma-separated task modules to import besides the app's own "
        "(as `celery worker -I`): a replayed task must be registered",
    )

    purge = sub.add_parser("purge", help="delete: TASK_ID, a filter, or --all")
    purge.add_argument("task_id", metavar="TASK_ID", nargs="?")
    _filters(purge)
    purge.add_argument("--all", action="store_true", help="every dead letter")
    parser.set_defaults(handler=handler, include="")
    return parser


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", dest="task_name", help="task name")
    parser.add_argument("--error", dest="error_type", help="error type (class name)")
    parser.add_argument("--since", type=_timestamp, help="last failure at or after (ISO 8601)")
    parser.add_argument("--until", type=_timestamp, help="last failure before (ISO 8601)")
    parser.add_argument(
        "--older-than-days", type=float, dest="older_than_days", help="last failure before N days"
    )


def _timestamp(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _where(args: argparse.Namespace) -> DeadLetterFilter:
    until = args.until
    if args.older_than_days is not None:
        cutoff = datetime.now(UTC).timestamp() - args.older_than_days * 86400
        until = cutoff if until is None else min(until, cutoff)
    return DeadLetterFilter(
        task_name=args.task_name, error_type=args.error_type, since=args.since, until=until
    )


def _has_filter(where: DeadLetterFilter) -> bool:
    return any(v is not None for v in (where.task_name, where.error_type, where.since, where.until))


def iso(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


async def run(args: argparse.Namespace, engine: AsyncEngine, app: Celery, out: TextIO) -> int:
    store = DeadLetterStore(engine)
    try:
        action: Callable[..., Any] = {
            "list": _list,
            "show": _show,
            "replay": _replay,
            "purge": _purge,
        }[args.action]
        return int(await action(args, store, app, out))
    finally:
        await engine.dispose()


async def _list(args: argparse.Namespace, store: DeadLetterStore, _app: Celery, out: TextIO) -> int:
    where = _where(args)
    if args.groups:
        groups = await store.groups(where)
        for group in groups:
            print(
                f"{group.count:>7}  {group.not_replayed:>7} not replayed  "
                f"last {iso(group.last_failed_at)}  {group.task_name}  {group.error_type}",
                file=out,
            )
        print(f"{len(groups)} group(s)", file=out)
        return 0
    letters, total = await store.page(where, offset=args.offset, limit=args.limit)
    for letter in letters:
        replayed = f"  replayed as {letter.replayed_as}" if letter.replayed_as else ""
        print(
            f"{iso(letter.last_failed_at)}  {letter.task_id}  {letter.task_name}  "
            f"{letter.error_type}  ({letter.reason}, {letter.attempts} attempt(s)){replayed}",
            file=out,
        )
    print(f"{len(letters)} of {total} dead letter(s)", file=out)
    return 0


async def _show(args: argparse.Namespace, store: DeadLetterStore, _app: Celery, out: TextIO) -> int:
    letter = await store.get(args.task_id)
    if letter is None:
        print(f"no dead letter {args.task_id!r}", file=out)
        return 1
    print(describe(letter, limit=None if args.full else SHOWN_CHARS), file=out)
    return 0


def describe(letter: DeadLetter, limit: int | None = SHOWN_CHARS) -> str:
    """A dead letter as text: its fields, error, traceback and arguments."""
    arguments = letter.arguments
    if letter.arguments_complete:
        arguments = json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    if limit is not None and len(arguments) > limit:
        arguments = f"{arguments[:limit]}\n... ({len(arguments) - limit} more characters; --full)"
    lines = [
        f"task id:      {letter.task_id}",
        f"task:         {letter.task_name}",
        f"queue:        {letter.queue or '-'}",
        f"reason:       {letter.reason}",
        f"attempts:     {letter.attempts}",
        f"worker:       {letter.worker or '-'}",
        f"first failed: {iso(letter.first_failed_at)}",
        f"last failed:  {iso(letter.last_failed_at)}",
        f"replayed as:  {letter.replayed_as or '-'}",
        f"error:        {letter.error_module}.{letter.error_type}: {letter.error_message}",
        "arguments"
        + ("" if letter.arguments_complete else " (not complete: cannot be replayed)")
        + ":",
        arguments,
    ]
    if letter.traceback:
        lines += ["traceback:", letter.traceback.rstrip()]
    return "\n".join(lines)


async def _replay(
    args: argparse.Namespace, store: DeadLetterStore, app: Celery, out: TextIO
) -> int:
    where = _where(args)
    if args.task_id is not None:
        if _has_filter(where):
            print("give a TASK_ID or filters, not both", file=out)
            return 2
        outcome = await replay(store, app, args.task_id)
        if not outcome.sent:
            print(f"not sent: {outcome.reason}", file=out)
            return 1
        print(f"replayed {args.task_id} as {outcome.replayed_as}", file=out)
        return 0
    if not _has_filter(where):
        print("give a TASK_ID, or --task/--error/--since/--until/--older-than-days", file=out)
        return 2
    summary = await replay_where(store, app, where)
    for refused in summary.refused:
        print(f"not sent: {refused.task_id}: {refused.reason}", file=out)
    print(f"replayed {summary.sent} dead letter(s), {len(summary.refused)} not sent", file=out)
    return 0 if summary.sent else 1


async def _purge(
    args: argparse.Namespace, store: DeadLetterStore, _app: Celery, out: TextIO
) -> int:
    where = _where(args)
    if args.task_id is None and not _has_filter(where) and not args.all:
        print("give a TASK_ID, a filter, or --all", file=out)
        return 2
    deleted = await store.purge(where, task_id=args.task_id)
    print(f"deleted {deleted} dead letter(s)", file=out)
    return 0 if deleted or args.task_id is None else 1
