"""The asyncio worker pool: async task bodies side by side, many per worker process.

Start a worker with it through Celery's hook for an out-of-tree pool::

    CELERY_CUSTOM_WORKER_POOL=app.core.background.pool:AsyncioPool \\
        celery -A app.core.background.celery_app worker -P custom -c 100

(or ``WORKER_POOL=asyncio scripts/worker.sh``). Up to ``-c`` async bodies
(``@db_task``, async ``@simple_task``) await at once on one event loop; sync
bodies run in threads, off the loop. This path is the stable one; the
implementation lives in ``internals/asyncio_pool.py``. See the guide, "Async
tasks side by side: the asyncio pool".
"""

from .internals.asyncio_pool import AsyncioPool

__all__ = ("AsyncioPool",)
