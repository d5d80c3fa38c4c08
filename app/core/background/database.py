"""The async engine the framework's db tasks use, for code that wants the same settings."""

from .internals.session import DatabaseConfig
from .internals.session import create_engine as create_database_engine

__all__ = ("DatabaseConfig", "create_database_engine")
