"""Background tasks on Celery for FastAPI services with an async SQLAlchemy database.

Import everything from here (and optional pieces from ``.extras``)::

    from app.core.background import simple_task, db_task, TaskContext
"""

from .celery_app import celery_app
from .internals.base import AsyncTask, BackgroundTask, DatabaseTask, SyncTask
from .internals.context import TaskContext
from .internals.decorators import db_task, simple_task
from .internals.exceptions import (
    NonRetriableTaskError,
    TaskArgumentError,
    TaskConfigurationError,
    TaskDefinitionError,
    TaskDiscoveryError,
    TaskError,
    TaskNotFoundError,
    TaskValidationError,
    is_retriable,
)
from .internals.hooks import TaskHook, hooks
from .internals.monitoring import StatsCounter, Timer
from .internals.retry import RETRY_POLICIES, QueueName, RetryPolicy, RetryPolicyName
from .internals.session import DatabaseConfig
from .internals.session import create_engine as create_database_engine
from .internals.testing import LoggedRecord, MockTaskSession, TaskTestContext, mock_task_session
from .internals.testing_db import create_test_engine, task_db_session

__all__ = (
    # decorators
    "db_task",
    "simple_task",
    # the context a task receives
    "TaskContext",
    "StatsCounter",
    "Timer",
    # errors
    "NonRetriableTaskError",
    "TaskArgumentError",
    "TaskConfigurationError",
    "TaskDefinitionError",
    "TaskDiscoveryError",
    "TaskError",
    "TaskNotFoundError",
    "TaskValidationError",
    "is_retriable",
    # policies, queues and task classes
    "RETRY_POLICIES",
    "QueueName",
    "RetryPolicy",
    "RetryPolicyName",
    "AsyncTask",
    "BackgroundTask",
    "DatabaseTask",
    "SyncTask",
    # extension points
    "TaskHook",
    "hooks",
    # Celery and the database
    "celery_app",
    "DatabaseConfig",
    "create_database_engine",
    # testing
    "LoggedRecord",
    "MockTaskSession",
    "TaskTestContext",
    "create_test_engine",
    "mock_task_session",
    "task_db_session",
)
