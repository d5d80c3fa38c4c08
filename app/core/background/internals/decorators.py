"""``@simple_task`` and ``@db_task``: declare a task, checked at import time."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, NoReturn, ParamSpec, Protocol, TypeVar, cast, overload

from celery import Task

from .admission.limits import KeyFunction, declared_limits
from .base import AsyncTask, BaseTask, DatabaseTask, SyncTask
from .context import TaskContext
from .exceptions import TaskDefinitionError
from .registry import current_app, registry, where
from .retry import QueueName, RetryPolicyName, check_queue, delay_scale, get_retry_policy

P = ParamSpec("P")
R = TypeVar("R")

# Options the framework sets from the retry policy and the decorator's own
# arguments; passing them again would make two sources of truth.
_OWNED_OPTIONS = frozenset(
    {
        "name",
        "queue",
        "base",
        "bind",
        "max_retries",
        "default_retry_delay",
        "autoretry_for",
        "retry_backoff",
        "retry_jitter",
        "retry_kwargs",
        "typing",
        "serializer",
    }
)


class _SimpleTaskDecorator(Protocol):
    @overload
    def __call__(  # type: ignore[overload-overlap]  # async first: a coroutine is also an R
        self, fn: Callable[Concatenate[TaskContext, P], Coroutine[Any, Any, R]]
    ) -> AsyncTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[Concatenate[TaskContext, P], R]) -> SyncTask[P, R]: ...


class _DbTaskDecorator(Protocol):
    def __call__(
        self, fn: Callable[Concatenate[TaskContext, P], Coroutine[Any, Any, R]]
    ) -> DatabaseTask[P, R]: ...


# Names that say "this is the context" even without an annotation (``lambda ctx: ...``).
_CONTEXT_NAMES = frozenset({"ctx", "context"})
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _is_context_annotation(annotation: Any, namespace: dict[str, Any]) -> bool:
    if isinstance(annotation, str):
        # ``from __future__ import annotations`` leaves the annotation as text.
        # Look the name up where the function was defined; text that does not
        # resolve at import time (``"bg.TaskContext"``) is judged by its name.
        text = annotation.strip("'\" ")
        head, *attributes = text.split(".")
        resolved = namespace.get(head)
        for attribute in attributes:
            resolved = getattr(resolved, attribute, None)
        if resolved is None:
            return text.rsplit(".", 1)[-1] in ("TaskContext", "TaskTestContext")
        annotation = resolved
    return isinstance(annotation, type) and issubclass(annotation, TaskContext)


def _param_text(param: inspect.Parameter) -> str:
    """``x: int = 1`` as written, also when the annotation is a string."""
    annotation = param.annotation
    if not isinstance(annotation, str):
        return str(param)
    text = str(param.replace(annotation=inspect.Parameter.empty))
    head, eq, default = text.partition("=")
    return f"{head}: {annotation}" + (f" = {default}" if eq else "")


def _check_context_parameter(
    fn: Callable[..., Any], name: str, signature: inspect.Signature
) -> None:
    """The first parameter must receive the context: annotated TaskContext, or named ctx/context.

    The worker passes the context positionally before the task's own
    arguments; a body declared otherwise would fail on every run, or take the
    context for its first argument.
    """
    params = list(signature.parameters.values())
    first = params[0] if params else None
    if (
        first is not None
        and first.kind in _POSITIONAL
        and (
            first.name in _CONTEXT_NAMES
            or _is_context_annotation(first.annotation, getattr(fn, "__globals__", {}))
        )
    ):
        return
    rest = params if first is None or first.name not in _CONTEXT_NAMES else params[1:]
    right = ", ".join(["ctx: TaskContext", *(_param_text(p) for p in rest)])
    got = f"got ({', '.join(_param_text(p) for p in params)})" if params else "got no parameter"
    raise TaskDefinitionError(
        f"{name}: the task function's first parameter must be the TaskContext ({got}); "
        f"declare it as: def {fn.__name__}({right})"
    )


def _build_task(
    fn: Callable[..., Any],
    base: type[BaseTask[Any, Any]],
    name: str,
    retry_policy: str,
    queue: str,
    limit_options: dict[str, Any],
    celery_options: dict[str, Any],
) -> Any:
    if not isinstance(name, str) or not name.strip():
        raise TaskDefinitionError(f"{where(fn)}: name is required (for example 'module.task')")
    policy = get_retry_policy(retry_policy)
    check_queue(queue)
    for option in celery_options:
        if option in _OWNED_OPTIONS:
            raise TaskDefinitionError(
                f"{name}: {option!r} is set by the framework (use retry_policy / queue instead)"
            )
        if not hasattr(Task, option):
            raise TaskDefinitionError(f"{name}: {option!r} is not a Celery task option")
    signature = inspect.signature(fn)
    _check_context_parameter(fn, name, signature)
    limits = declared_limits(name, signature, **limit_options)

    app = current_app()
    if (existing := registry.claim(name, fn)) is not None:
        if where(existing) != where(fn):
            raise TaskDefinitionError(
                f"task name {name!r} is used twice: by {where(existing)} and by {where(fn)}"
            )
        return app.tasks[name]  # the same module imported again
    scale = delay_scale(app)
    options: dict[str, Any] = {
        "time_limit": policy.time_limit,
        "soft_time_limit": policy.soft_time_limit,
        **celery_options,
        "name": name,
        "base": base,
        "bind": True,
        # Routed by ``route_to_declared_queue`` (Celery 5.7 deprecates the
        # ``queue`` task attribute in favour of routes).
        "background_queue": queue,
        "max_retries": policy.max_retries,
        # Used by Celery when it retries a task whose worker process died.
        "default_retry_delay": policy.initial_delay * scale,
        "body": staticmethod(fn),
        "body_signature": signature,
        "policy": policy,
        "limits": limits,
    }

    def run(self: BaseTask[Any, Any], *args: Any, **kwargs: Any) -> Any:
        return self.execute(args, kwargs)

    run.__name__ = fn.__name__
    run.__qualname__ = fn.__qualname__
    run.__module__ = fn.__module__
    run.__doc__ = fn.__doc__
    try:
        # celery-types has no overload for arbitrary task options.
        return cast(Any, app).task(lazy=False, **options)(run)
    except BaseException:
        registry.release(name)
        raise


_DECORATOR_USAGE = '@{decorator}(name="module.task_name", retry_policy="standard")'


def _check_called_with_arguments(decorator: str, fn: object, name: str | None) -> str:
    """The task name, or a TaskDefinitionError showing the right form of the decorator."""
    if fn is not None:
        # ``@simple_task`` with no parentheses: Python passed the function itself.
        what = getattr(fn, "__qualname__", repr(fn))
        usage = _DECORATOR_USAGE.format(decorator=decorator)
        raise TaskDefinitionError(
            f"{what}: @{decorator} needs its arguments: write {usage} above the function"
        )
    if name is None:
        usage = _DECORATOR_USAGE.format(decorator=decorator)
        raise TaskDefinitionError(f"name is required: {usage}")
    return name


@overload
def simple_task(fn: Callable[..., Any], /) -> NoReturn: ...
@overload
def simple_task(
    *,
    name: str,
    retry_policy: RetryPolicyName = "standard",
    queue: QueueName = "default",
    rate_limit: str | None = None,
    rate_limit_key: KeyFunction | None = None,
    concurrency: int | None = None,
    concurrency_key: KeyFunction | None = None,
    **celery_options: Any,
) -> _SimpleTaskDecorator: ...
def simple_task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    retry_policy: RetryPolicyName = "standard",
    queue: QueueName = "default",
    rate_limit: str | None = None,
    rate_limit_key: KeyFunction | None = None,
    concurrency: int | None = None,
    concurrency_key: KeyFunction | None = None,
    **celery_options: Any,
) -> _SimpleTaskDecorator:
    """A task without database access, on a plain function or an ``async def``.

    ``rate_limit`` (``"50/s"``, ``/m``, ``/h``) and ``concurrency`` (runs at
    once) hold across every worker, per key with ``rate_limit_key`` /
    ``concurrency_key`` (functions of the task's arguments); a run that must
    wait is sent back for later, not retried (``admission/``). Extra keyword
    arguments are Celery task options (``time_limit``, ``ignore_result``...)
    and behave as in Celery.
    """
    task_name = _check_called_with_arguments("simple_task", fn, name)
    limits = {
        "rate_limit": rate_limit,
        "rate_limit_key": rate_limit_key,
        "concurrency": concurrency,
        "concurrency_key": concurrency_key,
    }

    def decorate(fn: Callable[..., Any]) -> Any:
        base = AsyncTask if inspect.iscoroutinefunction(fn) else SyncTask
        return _build_task(fn, base, task_name, retry_policy, queue, limits, celery_options)

    return decorate


@overload
def db_task(fn: Callable[..., Any], /) -> NoReturn: ...
@overload
def db_task(
    *,
    name: str,
    retry_policy: RetryPolicyName = "standard",
    queue: QueueName = "default",
    rate_limit: str | None = None,
    rate_limit_key: KeyFunction | None = None,
    concurrency: int | None = None,
    concurrency_key: KeyFunction | None = None,
    **celery_options: Any,
) -> _DbTaskDecorator: ...
def db_task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    retry_policy: RetryPolicyName = "standard",
    queue: QueueName = "default",
    rate_limit: str | None = None,
    rate_limit_key: KeyFunction | None = None,
    concurrency: int | None = None,
    concurrency_key: KeyFunction | None = None,
    **celery_options: Any,
) -> _DbTaskDecorator:
    """A task with an ``AsyncSession`` at ``ctx.session``: commit on success, rollback on error.

    Limits and Celery options as for ``simple_task``.
    """
    task_name = _check_called_with_arguments("db_task", fn, name)
    limits = {
        "rate_limit": rate_limit,
        "rate_limit_key": rate_limit_key,
        "concurrency": concurrency,
        "concurrency_key": concurrency_key,
    }

    def decorate(fn: Callable[..., Any]) -> Any:
        if not inspect.iscoroutinefunction(fn):
            raise TaskDefinitionError(f"{task_name}: @db_task needs an 'async def' function")
        return _build_task(fn, DatabaseTask, task_name, retry_policy, queue, limits, celery_options)

    return decorate
