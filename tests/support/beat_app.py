"""``celery -A tests.support.beat_app beat``: the real app plus the tests' periodic tasks."""

from app.core.background import celery_app
from tests.support import tasks_dedup  # noqa: F401 - declares the periodic entries

__all__ = ["celery_app"]
