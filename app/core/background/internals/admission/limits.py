"""What a task declares about when it may start: a rate, a concurrency cap, their keys.

Declared on the decorator and checked when the task's module is imported::

    @simple_task(name="mail.send", rate_limit="50/s")
    @db_task(name="exports.build", concurrency=3,
             concurrency_key=lambda tenant_id, **_: tenant_id)

``rate_limit`` is ``"<n>/s"``, ``"<n>/m"`` or ``"<n>/h"``, shared by every
worker on every host (Celery's own option of that name limits each worker
process apart; the framework takes it over). A key function is called with
the task's arguments by name and returns the key (a ``str`` or an ``int``):
each key has a limit of its own.

Bursts: a rate limit lets through at most ``burst`` tasks at once beyond its
steady pace, a tenth of a second's worth and at least one (``50/s``: 5), so
no one-second window holds more than ``n + burst`` starts of a key.
"""

from __future__ import annotations

import inspect
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..exceptions import TaskArgumentsRefusedError, TaskDefinitionError

KeyFunction = Callable[..., object]

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")
_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}
# The burst a rate limit allows: this many seconds' worth of its rate, at least one.
BURST_SECONDS = 0.1


# Frozen or not, slotted or not: the same behaviour. pragma: no mutate
@dataclass(frozen=True, slots=True)  # pragma: no mutate
class RateLimit:
    """``per_second`` starts a second on average, ``burst`` of them at once."""

    text: str
    per_second: float

    @property
    def interval(self) -> float:
        """Seconds between two starts at the steady pace."""
        return 1.0 / self.per_second

    @property
    def burst(self) -> int:
        # At least one: the ceiling of a positive number.
        return math.ceil(self.per_second * BURST_SECONDS)


def parse_rate(task_name: str, text: object) -> RateLimit:
    """The ``RateLimit`` that ``"50/s"`` (``/m``, ``/h``) means, or a ``TaskDefinitionError``."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise TaskDefinitionError(
            f"{task_name}: rate_limit must look like '50/s', '100/m' or '1000/h' "
            f"(a positive number of tasks per second, minute or hour), not {text!r}"
        )
    count, unit = match.groups()
    return RateLimit(f"{count}/{unit}", float(count) / _SECONDS[unit])


# Frozen or not, slotted or not: the same behaviour. pragma: no mutate
@dataclass(frozen=True, slots=True)  # pragma: no mutate
class Limits:
    """A task's declared limits; ``scopes`` names what each run must take."""

    task_name: str
    rate: RateLimit | None = None
    rate_key: KeyFunction | None = None
    concurrency: int | None = None
    concurrency_key: KeyFunction | None = None

    @property
    def keyed(self) -> bool:
        """Whether a run's scopes depend on its arguments (a key function is declared)."""
        return self.rate_key is not None or self.concurrency_key is not None

    def concurrency_scope(self, arguments: Mapping[str, Any]) -> tuple[str, str] | None:
        """(store scope, key) of the concurrency cap this run takes, or None."""
        if self.concurrency is None:
            return None
        key = _key_of(self.task_name, "concurrency_key", self.concurrency_key, arguments)
        return f"concurrency:{self.task_name}:{key}", key

    def rate_scope(self, arguments: Mapping[str, Any]) -> tuple[str, str] | None:
        """(store scope, key) of the rate limit this run takes a token of, or None."""
        if self.rate is None:
            return None
        key = _key_of(self.task_name, "rate_limit_key", self.rate_key, arguments)
        return f"rate:{self.task_name}:{key}", key


def declared_limits(
    task_name: str,
    signature: inspect.Signature,
    *,  # pragma: no mutate (keyword-only or not: every caller names them)
    rate_limit: object = None,
    rate_limit_key: object = None,
    concurrency: object = None,
    concurrency_key: object = None,
) -> Limits | None:
    """The task's ``Limits`` (None without any), checked: a mistake fails the import."""
    if rate_limit_key is not None and rate_limit is None:
        raise TaskDefinitionError(f"{task_name}: rate_limit_key needs rate_limit=... as well")
    if concurrency_key is not None and concurrency is None:
        raise TaskDefinitionError(f"{task_name}: concurrency_key needs concurrency=... as well")
    if rate_limit is None and concurrency is None:
        return None
    if concurrency is not None and (
        not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1
    ):
        raise TaskDefinitionError(
            f"{task_name}: concurrency must be a whole number of runs at once (1 or more), "
            f"not {concurrency!r}"
        )
    parameters = _task_parameters(signature)
    return Limits(
        task_name,
        rate=None if rate_limit is None else parse_rate(task_name, rate_limit),
        rate_key=_checked_key(task_name, "rate_limit_key", rate_limit_key, parameters),
        concurrency=concurrency,
        concurrency_key=_checked_key(task_name, "concurrency_key", concurrency_key, parameters),
    )


def call_arguments(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """The task's arguments by parameter name (defaults filled in), as key functions get them."""
    bound = signature.bind(None, *args, **kwargs)  # None stands for the TaskContext
    bound.apply_defaults()
    arguments: dict[str, Any] = {}
    for index, (name, value) in enumerate(bound.arguments.items()):
        if index == 0:
            continue
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        else:
            arguments[name] = value
    return arguments


def _task_parameters(signature: inspect.Signature) -> list[str]:
    """The names a key function may be given: the task's parameters after the context."""
    names = list(signature.parameters)[1:]
    return [
        name
        for name in names
        if signature.parameters[name].kind is not inspect.Parameter.VAR_KEYWORD
    ]


def _checked_key(
    task_name: str, option: str, key: object, parameters: list[str]
) -> KeyFunction | None:
    if key is None:
        return None
    if not callable(key):
        raise TaskDefinitionError(
            f"{task_name}: {option} must be a function of the task's arguments, "
            f"for example lambda tenant_id, **_: tenant_id; got {key!r}"
        )
    try:
        inspect.signature(key).bind(**dict.fromkeys(parameters))
    except TypeError as exc:
        raise TaskDefinitionError(
            f"{task_name}: {option} is called with the task's arguments by name "
            f"({', '.join(parameters) or 'none'}) and cannot take them: {exc}; "
            "accept the ones it needs and **_ for the rest"
        ) from None
    except ValueError:
        pass  # a builtin without a signature: checked when it is called
    return key


def _key_of(
    task_name: str, option: str, key: KeyFunction | None, arguments: Mapping[str, Any]
) -> str:
    if key is None:
        return ""
    try:
        value = key(**arguments)
    except Exception as exc:  # noqa: BLE001 - the key function's own error, reported as such
        raise TaskArgumentsRefusedError(
            f"{task_name}: {option} failed on this run's arguments: {type(exc).__name__}: {exc}"
        ) from None
    if isinstance(value, bool) or not isinstance(value, str | int | uuid.UUID):
        raise TaskArgumentsRefusedError(
            f"{task_name}: {option} must return a str or an int, returned a {type(value).__name__}"
        )
    return str(value)
