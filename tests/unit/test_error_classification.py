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
