"""Every table of the application: its models, and the framework's own tables.

Import this module where all tables must be known: ``create_tables`` and
migrations (a model module alone registers only its own table).
"""

from app.core.background.database import include_framework_tables
from app.core.database import Base
from app.entities.models import Entity

# The framework's own tables (outbox, leases, completions, dead letters, limits)
# on the application's metadata: created with the application's tables
# (``create_tables``), made by the migrations and seen by Alembic's autogenerate.
include_framework_tables(Base.metadata)

__all__ = ("Entity",)
