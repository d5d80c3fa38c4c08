"""Optional pieces of the framework: ``from app.core.background.extras import ...``."""

from .circuit_breaker import CircuitBreaker, CircuitBreakerOpen

__all__ = ("CircuitBreaker", "CircuitBreakerOpen")
