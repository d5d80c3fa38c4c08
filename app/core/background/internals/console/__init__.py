"""The operations console: the router and page, the dead-letters CLI, and replay (which sends)."""
