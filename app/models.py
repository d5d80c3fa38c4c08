"""Every model of the application, imported so that its table is registered."""

from app.entities.models import Entity

__all__ = ("Entity",)
