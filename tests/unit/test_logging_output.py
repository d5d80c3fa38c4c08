"""Log output: masked secrets, Celery's task lines without arguments, one traceback."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from app.core.background.dedup import log_deduplicated
from app.core.background.internals.logging import (
    CeleryTaskRecordFilter,
    _FrameworkHandler,
    build_formatter,
    current_task_fields,
    mark_traceback_logged,
)
from app.core.background.observability import configure_logging, task_metrics

URL = "postgresql+asyncpg://app:s3cr3t@db.internal:5432/app"


def record(
    name: str = "app.tasks", msg: str = "hello", args: Any = None, **attrs: Any
) -> logging.LogRecord:
    made = logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)
    made.__dict__.update(attrs)
    return made


def render_json(made: logging.LogRecord, log_task_arguments: bool = False) -> dict[str, Any]:
    CeleryTaskRecordFilter(log_task_arguments).filter(made)
    rendered: dict[str, Any] = json.loads(build_formatter("json").format(made))
    return rendered


def test_json_line_carries_the_record_fields() -> None:
    line = render_json(record(fields={"task_id": "t1", "task_name": "n", "attempt": 0}))
    assert line["event"] == "hello"
    assert line["task_id"] == "t1"
    assert line["level"] == "info"
    assert "timestamp" in line


def test_a_plain_line_logged_during_a_run_carries_the_runs_id_and_name() -> None:
    """A library's line (no fields of its own) inside a run: the run's context variable."""
    token = current_task_fields.set({"task_id": "t7", "task_name": "n7", "attempt": 2})
    try:
        line = render_json(record(name="some.library"))
    finally:
        current_task_fields.reset(token)
    assert (line["task_id"], line["task_name"]) == ("t7", "n7")
    assert "task_id" not in render_json(record(name="some.library"))  # outside any run


def test_a_lines_own_fields_win_over_the_runs() -> None:
    token = current_task_fields.set({"task_id": "t7", "task_name": "n7"})
    try:
        line = render_json(record(fields={"task_id": "other", "task_name": "n"}))
    finally:
        current_task_fields.reset(token)
    assert line["task_id"] == "other"


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_passwords_are_masked_in_message_fields_and_traceback(log_format: str) -> None:
    try:
        raise ConnectionError(f"cannot reach {URL}")
    except ConnectionError:
        exc_info = sys.exc_info()
    made = record(msg="Connecting to %s", args=(URL,), fields={"url": URL}, exc_info=exc_info)
    output = build_formatter(log_format).format(made)  # type: ignore[arg-type]
    assert "s3cr3t" not in output
    assert "app:***@db.internal" in output


DETAILS = (
    'duplicate key value violates unique constraint "users_pkey"\n'
    "DETAIL:  Key (email)=(jane@example.com) already exists.",
    'insert or update on table "orders" violates foreign key constraint "fk"\n'
    'DETAIL:  Key (user_id, email)=(7, jane@example.com) is not present in table "users".',
    'null value in column "name" violates not-null constraint\n'
    "DETAIL:  Failing row contains (7, jane@example.com, null).",
)


@pytest.mark.parametrize("log_format", ["json", "console"])
@pytest.mark.parametrize("detail", DETAILS, ids=["unique", "foreign-key", "not-null"])
def test_database_row_values_are_masked_unless_arguments_are_logged(
    log_format: str, detail: str
) -> None:
    try:
        raise RuntimeError(detail)
    except RuntimeError:
        exc_info = sys.exc_info()
    made = record(msg="Task failed", fields={"error": detail}, exc_info=exc_info)
    hidden = build_formatter(log_format).format(made)  # type: ignore[arg-type]
    assert "jane@example.com" not in hidden
    assert "<hidden: BACKGROUND_LOG_TASK_ARGUMENTS=false>" in hidden
    assert "DETAIL:  " in hidden  # the constraint's name and the columns stay
    shown = build_formatter(log_format, hide_values=False).format(made)  # type: ignore[arg-type]
    assert "jane@example.com" in shown


def test_celery_success_line_hides_the_result_and_arguments_by_default() -> None:
    context = {"id": "t1", "name": "x.y", "return_value": "{'card': '4111'}", "runtime": 0.5,
               "args": "('4111',)", "kwargs": "{}"}  # fmt: skip
    made = record("celery.app.trace", "Task %(name)s[%(id)s] succeeded in %(runtime)ss: "
                  "%(return_value)s", context)  # fmt: skip
    line = render_json(made)
    assert "4111" not in json.dumps(line)
    assert line["task_id"] == "t1"
    assert line["task_name"] == "x.y"
    assert line["duration"] == 0.5


def test_celerys_success_line_is_dropped_for_framework_tasks_only() -> None:
    # The framework's own "Task succeeded" line (duration, outcome) replaces it.
    from celery.app.trace import LOG_SUCCESS

    from app.core.background.tasks import ping

    line_filter = CeleryTaskRecordFilter()
    ours = record("celery.app.trace", LOG_SUCCESS, {"id": "t1", "name": ping.name, "runtime": 0.1})
    plain = record(
        "celery.app.trace", LOG_SUCCESS, {"id": "t2", "name": "raw.task", "runtime": 0.1}
    )
    assert line_filter.filter(ours) is False
    assert line_filter.filter(plain) is True


def test_arguments_are_logged_when_asked() -> None:
    context = {"id": "t1", "name": "x.y", "args": "(42,)", "kwargs": "{'k': 1}"}
    line = render_json(record("celery.worker.strategy", "Task %(name)s[%(id)s] received",
                              context), log_task_arguments=True)  # fmt: skip
    assert line["args"] == "(42,)"
    assert line["kwargs"] == "{'k': 1}"


def test_celery_failure_line_drops_a_traceback_the_framework_logged() -> None:
    def failing(mark: bool) -> logging.LogRecord:
        try:
            raise ValueError("broken")
        except ValueError as exc:
            if mark:
                mark_traceback_logged(exc)
            context = {"id": "t1", "name": "x.y", "exc": "ValueError('broken')"}
            return record("celery.app.trace", "Task %(name)s[%(id)s] raised: %(exc)s", context,
                          exc_info=sys.exc_info())  # fmt: skip

    assert "exception" not in render_json(failing(mark=True))
    # A plain Celery task's failure keeps its traceback.
    assert "Traceback" in render_json(failing(mark=False))["exception"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    uvicorn = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate)
               for n in ("uvicorn", "uvicorn.error", "uvicorn.access")}  # fmt: skip
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, (saved, propagate) in uvicorn.items():
        logging.getLogger(name).handlers[:] = saved
        logging.getLogger(name).propagate = propagate


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_formats_uvicorn_and_keeps_other_handlers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    logging.getLogger("uvicorn.error").addHandler(logging.StreamHandler())
    configure_logging("json", "INFO")
    configure_logging("json", "INFO")  # again: still one framework handler
    root = logging.getLogger()
    assert other in root.handlers
    assert sum(isinstance(h, _FrameworkHandler) for h in root.handlers) == 1
    logging.getLogger("uvicorn.error").info("Started server on %s", "redis://:pw@cache:6379/0")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["logger"] == "uvicorn.error"
    assert line["event"] == "Started server on redis://:***@cache:6379/0"


@pytest.mark.usefixtures("restore_logging")
def test_log_deduplicated_logs_the_fields_and_counts(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "INFO")
    counter = task_metrics().deduplicated.labels("x.send", "default")
    before = counter._value.get()
    log_deduplicated("x.send", "id-1", "default", where="dispatch", key="user:1")
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["event"] == "Task deduplicated"
    assert line["task_id"] == "id-1"
    assert line["key"] == "user:1"
    assert line["outcome"] == "deduplicated"
    assert counter._value.get() == before + 1


def test_unregistered_task_line_does_not_dump_the_message() -> None:
    from celery.worker.consumer.consumer import UNKNOWN_TASK_ERROR

    made = record("celery.worker.consumer.consumer", UNKNOWN_TASK_ERROR,
                  (KeyError("x.y"), "[['4111-secret'], {}]", {"argsrepr": "('4111-secret',)"},
                   {"routing_key": "default"}))  # fmt: skip
    line = render_json(made)
    assert "4111-secret" not in json.dumps(line)
    assert "Received unregistered task of type 'x.y'" in line["event"]


# -- which level a Celery command logs at -------------------------------------


@pytest.mark.parametrize(
    ("given", "explicitly", "expected"),
    [
        ("WARNING", False, "DEBUG"),  # no -l: Celery's default gives way to LOG_LEVEL
        (30, False, "DEBUG"),
        ("WARNING", True, "WARNING"),  # -l WARNING on the command line
        ("INFO", True, "INFO"),
        (None, None, "DEBUG"),
        (30, None, "DEBUG"),  # a pool process that does not know: Celery's default
        (10, None, 10),  # ...or a level someone asked for
    ],
)
def test_loglevel_if_given_else_log_level(given: Any, explicitly: Any, expected: Any) -> None:
    from app.core.background.internals.logging import worker_log_level

    assert worker_log_level(given, explicitly, "DEBUG") == expected


def test_console_tracebacks_show_no_local_variables() -> None:
    """A task's arguments are locals of its frames: a traceback must not print them."""

    def send_mail(address: str) -> None:
        raise RuntimeError("mail server refused")

    secret = "-".join(("local", "secret", "31d5"))  # built at run time: not in the source lines
    try:
        send_mail(secret)
    except RuntimeError:
        exc_info = sys.exc_info()
    made = record(msg="Task failed", fields={}, exc_info=exc_info)
    text = build_formatter("console").format(made)  # type: ignore[arg-type]
    assert "mail server refused" in text  # the traceback is there
    assert secret not in text
