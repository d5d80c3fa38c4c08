"""The operations page: HTML rendered on the server from Jinja2 templates (autoescaped).

No JavaScript and no build step: tables, links, and forms whose buttons POST
to the router's actions, which redirect back here with a message. Every
value from a task (names, errors, arguments) is escaped by Jinja2; long
arguments and tracebacks are shown cut (``SHOWN_CHARS``), in full through
the JSON endpoint or the CLI.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from ..operations.dead_letters import DeadLetter, DeadLetterFilter, DeadLetterGroup
from ..operations.running import RunningTask

# How much of a dead letter's arguments and traceback the page shows.
SHOWN_CHARS = 20_000


@cache
def _templates() -> Environment:
    environment = Environment(
        loader=PackageLoader(__package__ or __name__, "templates"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["when"] = _when
    environment.filters["seconds"] = lambda value: f"{value:,.1f} s"
    return environment


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _shown(text: str | None) -> tuple[str, int]:
    """``text`` cut for the page, and how many characters were left out."""
    text = text or ""
    if len(text) <= SHOWN_CHARS:
        return text, 0
    return text[:SHOWN_CHARS], len(text) - SHOWN_CHARS


def render_overview(
    *,
    base: str,
    queues: dict[str, int | None],
    running: Sequence[RunningTask] | None,
    no_running_reason: str,
    groups: Sequence[DeadLetterGroup],
    letters: Sequence[DeadLetter],
    total: int,
    offset: int,
    page_size: int,
    where: DeadLetterFilter,
    message: str | None,
) -> str:
    filters = {
        k: v for k, v in (("task_name", where.task_name), ("error_type", where.error_type)) if v
    }
    return (
        _templates()
        .get_template("overview.html")
        .render(
            base=base,
            queues=queues,
            running=running,
            no_running_reason=no_running_reason,
            stuck=sum(task.stuck for task in running or ()),
            groups=groups,
            letters=letters,
            total=total,
            offset=offset,
            page_size=page_size,
            filters=filters,
            message=message,
        )
    )


def render_dead_letter(*, base: str, letter: DeadLetter, message: str | None) -> str:
    arguments: Any = letter.arguments
    if letter.arguments_complete:
        arguments = json.dumps(json.loads(letter.arguments), indent=2, ensure_ascii=False)
    shown_arguments, arguments_left = _shown(arguments)
    shown_traceback, traceback_left = _shown(letter.traceback)
    return (
        _templates()
        .get_template("dead_letter.html")
        .render(
            base=base,
            letter=letter,
            arguments=shown_arguments,
            arguments_left=arguments_left,
            traceback=shown_traceback,
            traceback_left=traceback_left,
            message=message,
        )
    )
