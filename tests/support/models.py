"""Tables used only by the tests' own tasks."""

from __future__ import annotations

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.database import Base


class Record(Base):
    """One row per completed test task: a second completion violates the key."""

    __tablename__ = "test_records"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker_pid: Mapped[int] = mapped_column(Integer, default=0)
