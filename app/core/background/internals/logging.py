"""Task logging: stdlib records with structured fields, rendered by structlog.

Celery and most libraries log through the standard library, so the framework
does too: every record goes through one handler whose structlog formatter
renders it for people (console) or machines (one JSON object per line). A
task's fields (id, name, queue, attempt, and whatever the task adds) travel on
the record as ``record.fields`` and become keys of the output.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any, Literal

import structlog
from celery.app.trace import LOG_FAILURE, LOG_RETRY, LOG_SUCCESS, build_tracer

from .registry import registry

SUCCESS = 25
logging.addLevelName(SUCCESS, "SUCCESS")

TASK_LOGGER_NAME = "app.tasks"
FRAMEWORK_LOGGER_NAME = "app.core.background"

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]*:)(?P<password>[^@\s/]+)@")


def mask_url_passwords(text: str) -> str:
    """Replace the password of every URL in ``text`` with ``***``."""
    if "://" not in text:  # most lines: a substring test instead of a scan with the pattern
        return text
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
        self._emit(level, message, exc_info, fields)

    def _emit(self, level: int, message: str, exc_info: bool, fields: Mapping[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level,
                message,
                exc_info=exc_info,
                extra={"fields": {**self.fields, **fields}},
                # _emit, log, ctx.log_*: the record points at the task's own line.
                stacklevel=4,
            )


# The fields of the task run in this context (set by ``runner.execute``): a
# line logged during the run without fields of its own (a library's, a plain
# logger in a body) gets its task_id and task_name. A context variable, not a
# thread-local: on the asyncio pool many runs interleave on one thread, each in
# its own context.
current_task_fields: ContextVar[Mapping[str, Any] | None] = ContextVar(
    "background_task_fields", default=None
)


def _merge_record_fields(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    record = event_dict.get("_record")
    fields = getattr(record, "fields", None)
    if isinstance(fields, Mapping):
        for key, value in fields.items():
            event_dict.setdefault(key, value)
    elif (current := current_task_fields.get()) is not None:
        event_dict.setdefault("task_id", current.get("task_id"))
        event_dict.setdefault("task_name", current.get("task_name"))
    return event_dict


# PostgreSQL's DETAIL of a constraint violation quotes the row's values, often a
# task's arguments: "Key (email)=(a@b.c) already exists.", "Failing row contains
# (1, a@b.c)." asyncpg puts it in the exception's text, so in tracebacks too.
_SQL_ROW_VALUES = re.compile(
    r"(?P<head>\bKey \([^()]*\)=\(|\bFailing row contains \()(?P<values>.*?)\)"
    r"(?= already exists| is not present| is still referenced| conflicts with|\.)"
)
HIDDEN_VALUES = "<hidden: BACKGROUND_LOG_TASK_ARGUMENTS=false>"


def mask_sql_values(text: str) -> str:
    """Replace the row values that PostgreSQL quotes in a constraint error's DETAIL."""
    if "Key (" not in text and "Failing row contains (" not in text:
        return text  # most lines (see mask_url_passwords)
    return _SQL_ROW_VALUES.sub(lambda m: f"{m['head']}{HIDDEN_VALUES})", text)


class _MaskingFormatter(structlog.stdlib.ProcessorFormatter):
    """Masks URL passwords (and database row values) in the rendered line.

    Message, fields and traceback alike: the whole line is masked after rendering.
    """

    def __init__(self, *args: Any, hide_values: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hide_values = hide_values

    def format(self, record: logging.LogRecord) -> str:
        line = mask_url_passwords(super().format(record))
        return mask_sql_values(line) if self.hide_values else line


# -- Celery's own task lines ----------------------------------------------------

# Marks an exception whose traceback the framework has logged (LifecycleLogger).
LOGGED_MARK = "_background_traceback_logged"

# Celery's per-task lines: "received" (worker.strategy), "succeeded", "raised
# unexpected", "retry" (app.trace). Their %-args are a dict with the task's id
# and name, and its arguments and result.
_CELERY_TASK_LOGGERS = frozenset({"celery.app.trace", "celery.worker.strategy"})
_CELERY_CONSUMER_LOGGER = "celery.worker.consumer.consumer"
_HIDDEN = HIDDEN_VALUES
_SECRET_KEYS = ("args", "kwargs", "return_value", "traceback")
# Celery's outcome lines ("succeeded in", "retry: Retry in", "raised unexpected"
# or "raised expected"): Celery strips the failure format before logging it.
_REPLACED_LINES = frozenset(line.strip() for line in (LOG_SUCCESS, LOG_RETRY, LOG_FAILURE))


# The app setting (``BACKGROUND_LOG_RECEIVED``) that keeps Celery's "received" line at INFO.
LOG_RECEIVED_SETTING = "background_log_received"


def received_line(app: Any) -> Callable[..., None]:
    """How Celery's handler of a framework task's messages logs "Task ... received".

    At DEBUG unless ``app`` says otherwise (``BACKGROUND_LOG_RECEIVED``, or
    ``BACKGROUND_LOG_TASK_ARGUMENTS``: the received line is the one that
    shows a framework task's arguments). The framework's own line ends every
    run (``Task succeeded``/``failed``, with its duration), and the received
    line, formatted in the consumer's thread while the tasks log in theirs,
    was the largest part of the asyncio pool's cost per task (about 500 µs of
    worker CPU per task with 100 tasks per process: 1,470 against 920 µs).
    Passed to Celery's strategy as its ``info``, the documented argument.
    """
    logger = logging.getLogger("celery.worker.strategy")
    at_info = app.conf.get(LOG_RECEIVED_SETTING) or app.conf.get("background_log_task_arguments")
    return logger.info if at_info else logger.debug


def build_quiet_tracers(app: Any, hostname: str | None) -> None:
    """Rebuild the framework tasks' tracers without Celery's success record.

    Celery decides once per tracer, when it builds it, whether to log "Task
    ... succeeded in ...s: <result>" (``celery.app.trace.build_tracer``:
    ``logger.isEnabledFor(INFO)``), and then builds the record, with the
    repr of the result and the arguments, for every run. For a framework task
    the log filter drops that record anyway (the framework's ``Task
    succeeded`` says the same). Built while that logger is above INFO, the
    tracer skips it. Called where Celery builds tracers: the consumer's
    ``update_strategies`` (the worker's own process) and a prefork child's
    start (``worker_process_init``). The level is raised for the moment of
    the build only; another thread's line from that logger meanwhile (a plain
    Celery task's success, rare at start-up) would be lost, never a failure
    (logged at ERROR).
    """
    trace_logger = logging.getLogger("celery.app.trace")
    level = trace_logger.level
    trace_logger.setLevel(logging.WARNING)
    try:
        for name, task in list(app.tasks.items()):
            if name in registry:
                task.__trace__ = build_tracer(name, task, app.loader, hostname, app=app)
    finally:
        trace_logger.setLevel(level)


def mark_traceback_logged(exc: BaseException) -> None:
    """Say that ``exc``'s traceback is logged, so Celery's failure line omits it."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, LOGGED_MARK, True)


class CeleryTaskRecordFilter(logging.Filter):
    """Gives Celery's task lines the task fields, hides arguments, drops repeated tracebacks."""

    def __init__(self, log_task_arguments: bool = False) -> None:
        super().__init__()
        self.log_task_arguments = log_task_arguments

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == _CELERY_CONSUMER_LOGGER:
            self._hide_message_dump(record)
            return True
        if record.name not in _CELERY_TASK_LOGGERS or not isinstance(record.args, Mapping):
            return True
        if str(record.msg).strip() in _REPLACED_LINES and record.args.get("name") in registry:
            # The framework's own "Task succeeded", "Task failed, will retry" and
            # "Task failed" lines (with duration, outcome, reason and error fields)
            # replace Celery's: one line per outcome, as in plain Celery.
            return False
        context = dict(record.args)
        fields: dict[str, Any] = {"task_id": context.get("id"), "task_name": context.get("name")}
        if "runtime" in context:
            fields["duration"] = context["runtime"]
        if self.log_task_arguments:
            fields.update(
                (key, context[key]) for key in ("args", "kwargs", "return_value") if key in context
            )
        else:
            for key in _SECRET_KEYS:
                if key in context:
                    context[key] = _HIDDEN
            # The message is formatted from these args ("succeeded in 0.1s: <result>").
            record.args = context
            if hasattr(record, "data"):
                record.data = context
        record.fields = {**fields, **(getattr(record, "fields", None) or {})}
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and getattr(exc, LOGGED_MARK, False):
            record.exc_info = None
            record.exc_text = None
        return True

    def _hide_message_dump(self, record: logging.LogRecord) -> None:
        """Celery's "unregistered task" / "invalid message" lines print the whole message."""
        args = record.args
        if self.log_task_arguments or not isinstance(args, tuple) or len(args) < 2:
            return
        if "message body was" in str(record.msg):
            # (error, body[, headers, delivery_info]): keep the error, hide the rest.
            record.args = (args[0], *([_HIDDEN] * (len(args) - 1)))


def trace_ids_processor() -> Any:
    """A processor adding ``trace_id`` and ``span_id`` of the current span (tracing on).

    The span is the one current where the line is logged: a task's run, an
    HTTP request, a SQL statement. Imported only when tracing is on.
    """
    from opentelemetry.trace import get_current_span

    def add_trace_ids(
        _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        context = get_current_span().get_span_context()
        if context.is_valid:
            event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
            event_dict.setdefault("span_id", format(context.span_id, "016x"))
        return event_dict

    return add_trace_ids


def build_formatter(
    log_format: Literal["console", "json"], *, hide_values: bool = True, trace_ids: bool = False
) -> logging.Formatter:
    """``hide_values``: mask database row values (False with BACKGROUND_LOG_TASK_ARGUMENTS).

    ``trace_ids``: every line logged inside a span carries its ``trace_id`` and ``span_id``.
    """
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        tail: list[Any] = [structlog.processors.format_exc_info]
    else:
        # Plain tracebacks: structlog's default (Rich) prints every frame's local
        # variables, task arguments included, and wraps lines inside boxes, where
        # the masking of passwords and row values cannot find them.
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        tail = []
    return _MaskingFormatter(
        hide_values=hide_values,
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _merge_record_fields,
            *([trace_ids_processor()] if trace_ids else []),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            renderer,
        ],
    )


# Loggers that come with handlers of their own (uvicorn's): made to use ours.
_PROPAGATE_TO_ROOT = ("uvicorn", "uvicorn.error", "uvicorn.access")


class _FrameworkHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``configure_logging`` installs (and replaces when called again).

    Writes to ``sys.stderr`` as it was when created (the worker later replaces
    ``sys.stderr`` with a proxy that logs), unless that stream was closed since
    (a test runner's capture): then to the current ``sys.stderr``.
    """

    @property
    def stream(self) -> Any:
        stream = self._stream
        return sys.stderr if getattr(stream, "closed", False) else stream

    @stream.setter
    def stream(self, value: Any) -> None:
        self._stream = value


def worker_log_level(
    given: int | str | None, given_explicitly: bool | None, configured: int | str
) -> int | str:
    """The level of a Celery command's logs: ``-l``/``--loglevel`` if given, else ``LOG_LEVEL``.

    ``given`` is what Celery passes to its ``setup_logging`` signal: the
    option's value, or its default (WARNING) when the option is absent, which
    would hide every task line of a worker started as ``celery -A ... worker``.
    ``given_explicitly`` says whether the option was on the command line;
    ``None`` when that is unknown (a pool process started without the
    parent's state), where a level other than Celery's default must have been
    asked for.
    """
    if not given:
        return configured
    if given_explicitly is None:
        given_explicitly = _level_number(given) != logging.WARNING
    return given if given_explicitly else configured


def _level_number(level: int | str) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    return number if isinstance(number, int) else logging.WARNING


def configure_logging(
    log_format: Literal["console", "json"],
    level: int | str = "INFO",
    *,
    log_task_arguments: bool = False,
    trace_ids: bool = False,
) -> None:
    """Send every stdlib record (ours, Celery's, uvicorn's, the libraries') through one formatter.

    Called by the worker (Celery's ``setup_logging`` signal) and the API (``create_app``).
    Handlers others installed on the root logger (pytest's capture) are kept.
    ``trace_ids`` (tracing on): lines carry the current span's trace and span ids.
    """
    handler = _FrameworkHandler()
    handler.setFormatter(
        build_formatter(log_format, hide_values=not log_task_arguments, trace_ids=trace_ids)
    )
    handler.addFilter(CeleryTaskRecordFilter(log_task_arguments))
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _FrameworkHandler)]
    root.addHandler(handler)
    root.setLevel(level)
    for name in _PROPAGATE_TO_ROOT:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
