"""Background tasks on Celery for FastAPI services with an async SQLAlchemy database.

Everything a task module needs comes from here::

    from app.core.background import simple_task, db_task, TaskContext

The rest lives in public modules named for their job (see the guide, README.md):
``.testing`` (test helpers), ``.fastapi`` (the session that sends on commit,
task status), ``.dispatch`` (typed options, bulk, after commit), ``.dedup``
(task id helpers), ``.outbox`` (transactional outbox and its relay),
``.observability`` (hooks, logging, metrics), ``.database`` (engines),
``.pool`` (the asyncio worker pool: ``-P custom``), ``.operations`` (dead
letters, replay, running tasks, the operations router) and ``.extras``
(circuit breaker).
"""

from .celery_app import celery_app
from .internals.base import BaseTask, DatabaseTask
from .internals.context import TaskContext
from .internals.decorators import db_task, simple_task
from .internals.delivery.dedup import TaskIdRevokedError
from .internals.delivery.periodic import periodic
from .internals.exceptions import (
    MissingTablesError,
    NonRetriableTaskError,
    TaskArgumentError,
    TaskConfigurationError,
    TaskDefinitionError,
    TaskDiscoveryError,
    TaskDispatchError,
    TaskError,
    TaskNotFoundError,
    TaskResultError,
    TaskValidationError,
    is_retriable,
)
from .internals.retry import RETRY_POLICIES, QueueName, RetryPolicy, RetryPolicyName
from .internals.testing import TaskTestContext, mock_task_session

__all__ = (
    # decorators
    "db_task",
    "simple_task",
    "periodic",
    # the context a task receives
    "TaskContext",
    # errors
    "TaskError",
    "NonRetriableTaskError",
    "TaskValidationError",
    "TaskNotFoundError",
    "TaskConfigurationError",
    "MissingTablesError",
    "TaskArgumentError",
    "TaskDefinitionError",
    "TaskDiscoveryError",
    "TaskDispatchError",
    "TaskIdRevokedError",
    "TaskResultError",
    "is_retriable",
    # retry policies and queues
    "RETRY_POLICIES",
    "RetryPolicy",
    "RetryPolicyName",
    "QueueName",
    # task classes and the Celery app
    "BaseTask",
    "DatabaseTask",
    "celery_app",
    # testing (the specification's helpers; more in .testing)
    "TaskTestContext",
    "mock_task_session",
)
