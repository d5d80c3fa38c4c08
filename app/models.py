"""Every table of the application: its models, and the framework's own tables.

Import this module where all tables must be known: ``create_tables`` and
migrations (a model module alone registers only its own table).
"""

from app.core.background.outbox import outbox_table
from app.core.database import Base
from app.entities.models import Entity

# The framework's outbox table, on the application's metadata: created with the
# application's tables and seen by Alembic's autogenerate.
outbox_table.to_metadata(Base.metadata)

__all__ = ("Entity",)
