"""The application's declarative base: the only thing a model module imports.

A model import stays cheap and free of side effects (no Celery app, no
settings, no files): engines and sessions live in ``app/core/engine.py`` and
the FastAPI dependencies in ``app/api/deps.py``. ``app/models.py`` lists every
model and puts the framework's own tables on this metadata.
"""

from __future__ import annotations

from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    """Base class of the application's models."""
