"""Task logging: stdlib records with structured fields, rendered by structlog.

Celery and most libraries log through the standard library, so the framework
does too: every record goes through one handler whose structlog formatter
renders it for people (console) or machines (one JSON object per line). A
task's fields (id, name, queue, attempt, and whatever the task adds) travel on
the record as ``record.fields`` and become keys of the output.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

import structlog

SUCCESS = 25
logging.addLevelName(SUCCESS, "SUCCESS")

TASK_LOGGER_NAME = "app.tasks"
FRAMEWORK_LOGGER_NAME = "app.core.background"

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]*:)(?P<password>[^@\s/]+)@")


def mask_url_passwords(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``***``."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


class TaskLogger:
    """Logs for one task run: every record carries the run's fields."""

    __slots__ = ("_logger", "fields")

    def __init__(self, fields: Mapping[str, Any], logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(TASK_LOGGER_NAME)
        self.fields = dict(fields)

    def bind(self, **fields: Any) -> None:
        """Add fields to every later record of this run (duration, outcome...)."""
        self.fields.update(fields)

    def log(self, level: int, message: str, exc_info: bool = False, **fields: Any) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level,
                message,
                exc_info=exc_info,
                extra={"fields": {**self.fields, **fields}},
                stacklevel=3,
            )


def _merge_record_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    record = event_dict.get("_record")
    fields = getattr(record, "fields", None)
    if isinstance(fields, Mapping):
        for key, value in fields.items():
            event_dict.setdefault(key, value)
    return event_dict


def _mask_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str) and "://" in value:
            event_dict[key] = mask_url_passwords(value)
    return event_dict


def build_formatter(log_format: Literal["console", "json"]) -> logging.Formatter:
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        tail: list[Any] = [structlog.processors.format_exc_info]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        tail = []
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _merge_record_fields,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            _mask_secrets,
            renderer,
        ],
    )


def configure_logging(log_format: Literal["console", "json"], level: int | str = "INFO") -> None:
    """Send every stdlib record (ours, Celery's, the libraries') through one formatter."""
    handler = logging.StreamHandler()
    handler.setFormatter(build_formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
