"""Endpoint latency under 50 concurrent clients, and whether dispatching blocks the event loop.

Run: ``.venv/bin/python bench/bench_api_dispatch.py [REQUESTS_PER_ENDPOINT] [BROKER_DELAY_MS]``.
With a delay, Redis is reached through a local proxy that holds every request
that long: a remote broker's round trip, the case where blocking the loop hurts.
Starts uvicorn (one process) as a subprocess on Redis db 15 and a private
PostgreSQL database, then for each dispatching endpoint sends requests from
50 concurrent httpx clients while a probe calls ``GET /bench/noop`` every
10 ms: the probe's latency shows how long the event loop was blocked.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx

REDIS_URL = "redis://127.0.0.1:6379/15"
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DB_NAME = f"bench_api_{os.getpid()}"
CONCURRENCY = 50
ENDPOINTS = [
    "/bench/async-on-loop",
    "/bench/sync-def",
    "/bench/async-to-thread",
    "/bench/after-commit",
    "/bench/outbox",
]


async def admin(sql: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(ADMIN_DSN)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def start_delay_proxy(delay: float) -> int:
    """A TCP proxy to Redis that delays each request by ``delay`` seconds; its port."""
    import threading

    port = free_port()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wait: float) -> None:
        try:
            while data := await reader.read(65536):
                if wait:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 6379)
        await asyncio.gather(pipe(reader, up_writer, delay), pipe(up_reader, writer, 0))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    threading.Thread(target=asyncio.run, args=(serve(),), daemon=True).start()
    time.sleep(0.3)
    return port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] * 1e3


async def load(base: str, path: str, total: int) -> tuple[list[float], list[float], float]:
    latencies: list[float] = []
    probes: list[float] = []
    remaining = total
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=CONCURRENCY + 5)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        async def one_client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                response = await client.post(path)
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

        async def probe() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=60) as own:
                while not done.is_set():
                    start = time.perf_counter()
                    (await own.get("/bench/noop")).raise_for_status()
                    probes.append(time.perf_counter() - start)
                    await asyncio.sleep(0.01)

        started = time.perf_counter()
        probe_task = asyncio.create_task(probe())
        await asyncio.gather(*(one_client() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
        done.set()
        await probe_task
    return latencies, probes, elapsed


async def bench(base: str, total: int) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        for path in ENDPOINTS:  # warm-up
            for _ in range(20):
                (await client.post(path)).raise_for_status()
    print(f"\n{total} requests per endpoint, {CONCURRENCY} concurrent clients, one uvicorn process")
    print(f"{'endpoint':26} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'loop probe p50/p99 ms':>22}")
    for path in ENDPOINTS:
        latencies, probes, elapsed = await load(base, path, total)
        print(
            f"{path:26} {pct(latencies, 0.5):8.1f} {pct(latencies, 0.99):8.1f} "
            f"{total / elapsed:8.0f} {pct(probes, 0.5):10.1f} / {pct(probes, 0.99):<8.1f}"
        )


def main() -> None:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    delay_ms = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    broker_url = REDIS_URL
    if delay_ms:
        broker_url = f"redis://127.0.0.1:{start_delay_proxy(delay_ms / 1000)}/15"
    print(f"broker round trip delayed by {delay_ms:g} ms")
    asyncio.run(admin(f'CREATE DATABASE "{DB_NAME}"'))
    port = free_port()
    env = {
        **os.environ,
        "CELERY_BROKER_URL": broker_url,
        "CELERY_RESULT_BACKEND": broker_url,
        "DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{DB_NAME}",
        "DATABASE_CREATE_TABLES": "true",
        "DATABASE_POOL_SIZE": "20",
        "LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.bench_api_app:app", "--port", str(port),
         "--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "60"],
        env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/bench/noop", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        asyncio.run(bench(base, total))
    finally:
        server.terminate()
        server.wait(20)
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
