"""The transactional outbox: a task written as a row in the caller's transaction, sent by a relay.

``task.delay_via_outbox(session, ...)`` adds the row; ``python -m
app.core.background relay`` (or ``run_relay``) sends pending rows. Put
``outbox_table`` on your migrations' metadata, or every framework table at
once with ``app.core.background.database.include_framework_tables``.
"""

from .internals.delivery.outbox import (
    OutboxMessage,
    enqueue_via_outbox,
    outbox_table,
    relay_outbox,
    run_relay,
)

__all__ = ("OutboxMessage", "outbox_table", "enqueue_via_outbox", "relay_outbox", "run_relay")
