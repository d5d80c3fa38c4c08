"""Async-native task queues run on the same machine, same jobs, same run (``bench/io.py``).

Each module here is what that library's documentation shows for a worker:
its broker on the benchmark's own redis-server (``BENCH_PEER_REDIS``), its
defaults except the concurrency, and the same two jobs as the framework's
``bench.sleep`` and ``bench.pg_sleep`` (``BENCH_DATABASE_URL``, pool
``BENCH_POOL_SIZE`` + 10 overflow per process, as the framework's engine).
The libraries are the ``bench`` optional dependencies (pyproject.toml),
installed by the benchmark when missing, never by CI.
"""
