"""Background tasks on Celery for FastAPI services with an async SQLAlchemy database.

Import everything from here (and optional pieces from ``.extras``)::

    from . import simple_task, db_task, TaskContext
"""

from .celery_app import celery_app
from .internals.base import AsyncTask, BaseTask, DatabaseTask, SyncTask
from .internals.context import TaskContext
from .internals.decorators import db_task, simple_task
from .internals.delivery.after_commit import TaskSession, enqueue_after_commit, pending_dispatches
from .internals.delivery.bulk import dispatch_many
from .internals.delivery.dedup import (
    TaskIdRevokedError,
    args_key,
    daily_key,
    lease_lifetime,
    notify_key,
    update_key,
)
from .internals.delivery.options import DispatchOptions, TaskOptions
from .internals.delivery.outbox import (
    OutboxMessage,
    enqueue_via_outbox,
    outbox_table,
    relay_outbox,
    run_relay,
)
from .internals.delivery.periodic import periodic
from .internals.exceptions import (
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
from .internals.logging import configure_logging, log_deduplicated, mask_url_passwords
from .internals.monitoring import StatsCounter, TaskMetrics, Timer, task_metrics
from .internals.observability.hooks import TaskHook, hooks
from .internals.observability.metrics_export import (
    enable_multiprocess as enable_multiprocess_metrics,
)
from .internals.observability.metrics_export import render_metrics
from .internals.operations.status import TaskState, TaskStatus, get_task_status, record_revoked
from .internals.retry import RETRY_POLICIES, QueueName, RetryPolicy, RetryPolicyName
from .internals.session import DatabaseConfig
from .internals.session import create_engine as create_database_engine
from .internals.testing import LoggedRecord, MockTaskSession, TaskTestContext, mock_task_session
from .internals.testing_db import create_test_engine, task_db_session

__all__ = (
    # decorators
    "db_task",
    "simple_task",
    # deduplication and periodic tasks
    "periodic",
    "args_key",
    "daily_key",
    "notify_key",
    "update_key",
    "lease_lifetime",
    "TaskIdRevokedError",
    # the context a task receives
    "TaskContext",
    "StatsCounter",
    "Timer",
    # errors
    "NonRetriableTaskError",
    "TaskArgumentError",
    "TaskDispatchError",
    "TaskConfigurationError",
    "TaskDefinitionError",
    "TaskDiscoveryError",
    "TaskError",
    "TaskNotFoundError",
    "TaskResultError",
    "TaskValidationError",
    "is_retriable",
    # policies, queues and task classes
    "RETRY_POLICIES",
    "QueueName",
    "RetryPolicy",
    "RetryPolicyName",
    "AsyncTask",
    "BaseTask",
    "DatabaseTask",
    "SyncTask",
    # extension points
    "TaskHook",
    "hooks",
    # logs and metrics
    "configure_logging",
    "enable_multiprocess_metrics",
    "log_deduplicated",
    "mask_url_passwords",
    "render_metrics",
    "TaskMetrics",
    "task_metrics",
    # Celery and the database
    "celery_app",
    "DatabaseConfig",
    "create_database_engine",
    # bulk dispatch: many calls of one task in one go (task.delay_many)
    "dispatch_many",
    # dispatch from a web request: after commit, through the outbox, typed options
    "DispatchOptions",
    "TaskOptions",
    "TaskSession",
    "enqueue_after_commit",
    "enqueue_via_outbox",
    "pending_dispatches",
    "OutboxMessage",
    "outbox_table",
    "relay_outbox",
    "run_relay",
    # task status
    "TaskState",
    "TaskStatus",
    "get_task_status",
    "record_revoked",
    # testing
    "LoggedRecord",
    "MockTaskSession",
    "TaskTestContext",
    "create_test_engine",
    "mock_task_session",
    "task_db_session",
)
