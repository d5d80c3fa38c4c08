"""Ways to send beyond ``.delay()``: typed options, many calls at once, after a commit.

Most code uses the task's own methods (``task.options(countdown=5).delay(...)``,
``task.delay_many([...])``, ``task.delay_on_commit(session, ...)``); these are
the same operations as functions, and the types of the typed options.
"""

from .internals.delivery.after_commit import enqueue_after_commit
from .internals.delivery.bulk import dispatch_many
from .internals.delivery.options import DispatchOptions, TaskOptions

__all__ = ("DispatchOptions", "TaskOptions", "dispatch_many", "enqueue_after_commit")
