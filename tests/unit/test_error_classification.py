"""Which errors are retried: the specification's Error Handling section."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from app.core.background import (
    TaskConfigurationError,
    TaskNotFoundError,
    TaskValidationError,
    is_retriable,
)
from app.core.background.internals.exceptions import sqlstate_of


class FakeDriverError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"driver error {sqlstate}")
        self.sqlstate = sqlstate


def dbapi_error(sqlstate: str) -> DBAPIError:
    return DBAPIError("SELECT 1", {}, FakeDriverError(sqlstate))


@pytest.mark.parametrize(
    "error",
    [
        TaskValidationError("bad"),
        TaskNotFoundError("missing"),
        TaskConfigurationError("no key"),
        IntegrityError("INSERT", {}, Exception("duplicate")),
        dbapi_error("23505"),  # unique_violation reported as a plain DBAPIError
        dbapi_error("23503"),
    ],
)
def test_non_retriable(error: BaseException) -> None:
    assert not is_retriable(error)


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("SELECT 1", {}, Exception("connection lost")),
        TimeoutError("query timeout"),
        TimeoutError(),
        RuntimeError("unknown"),
        ConnectionError("reset"),
        dbapi_error("08006"),
        dbapi_error("40001"),
        dbapi_error("40P01"),
        dbapi_error("53300"),
        dbapi_error("57P01"),
    ],
)
def test_retriable(error: BaseException) -> None:
    assert is_retriable(error)


def test_error_fields_are_in_the_message() -> None:
    error = TaskNotFoundError("User not found", user_id="42")
    assert str(error) == "User not found (user_id='42')"
    assert error.fields == {"user_id": "42"}
    assert error.message == "User not found"


def test_docstring_is_the_default_message() -> None:
    assert str(TaskValidationError()) == "The task received invalid input."


# -- the SQLSTATE walk (scripts/mutation.sh exceptions) ----------------------


class Carrier(Exception):
    """A driver error carrying its code the way asyncpg (sqlstate) or psycopg (pgcode) does."""

    def __init__(self, sqlstate: object = None, pgcode: object = None) -> None:
        super().__init__("driver error")
        self.sqlstate = sqlstate
        self.pgcode = pgcode


def wrapped(orig: BaseException | None, cause: BaseException | None = None) -> DBAPIError:
    if orig is not None and cause is not None:
        orig.__cause__ = cause
    return DBAPIError("SELECT 1", {}, orig)  # type: ignore[arg-type] # orig may be None


def test_sqlstate_from_psycopgs_pgcode() -> None:
    assert sqlstate_of(wrapped(Carrier(pgcode="23505"))) == "23505"
    assert not is_retriable(wrapped(Carrier(pgcode="23505")))


def test_sqlstate_from_the_drivers_cause_when_the_adapter_has_none() -> None:
    """SQLAlchemy's asyncpg adapter error may carry no code; asyncpg's own (its cause) does."""
    error = wrapped(Carrier(), cause=Carrier(sqlstate="40P01"))
    assert sqlstate_of(error) == "40P01"


def test_an_empty_or_non_text_code_is_skipped_for_the_next_source() -> None:
    assert sqlstate_of(wrapped(Carrier(sqlstate=""), cause=Carrier(sqlstate="23505"))) == "23505"
    assert sqlstate_of(wrapped(Carrier(sqlstate=23505), cause=Carrier(pgcode="08006"))) == "08006"
    assert sqlstate_of(wrapped(Carrier(sqlstate=""))) is None


def test_sqlstate_on_the_error_itself_when_it_wraps_nothing() -> None:
    error = wrapped(None)
    error.sqlstate = "3D000"  # type: ignore[attr-defined]
    assert sqlstate_of(error) == "3D000"
    assert not is_retriable(error)
    assert sqlstate_of(RuntimeError("no database error")) is None


def test_a_code_outside_the_list_is_retried() -> None:
    """Neither a constraint nor a configuration error (42P01: no such table): retried."""
    assert is_retriable(dbapi_error("42P01"))


@pytest.mark.parametrize("sqlstate", ["28000", "28P01", "3D000"])
def test_database_configuration_errors_are_not_retriable(sqlstate: str) -> None:
    assert not is_retriable(dbapi_error(sqlstate))


def test_a_non_database_error_with_a_constraint_code_is_retried() -> None:
    """The SQLSTATE rule is for database errors only."""
    assert is_retriable(Carrier(sqlstate="23505"))
