"""Private machinery of the background framework; import from ``app.core.background``."""
