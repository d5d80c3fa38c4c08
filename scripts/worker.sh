#!/usr/bin/env bash
# Start the workers the way bench/RESULTS.md found fastest with the same guarantees.
#
#   scripts/worker.sh [any celery worker option, e.g. -Q high_priority,default]
#   WORKER_POOL=asyncio scripts/worker.sh     # async tasks side by side (issue 14)
#
# WORKER_POOL=prefork (default):
#   Redis broker: WORKERS worker processes (default: one per core), each
#   --pool prefork --concurrency 1. The worker's main process (BRPOP, then
#   MULTI/EXEC to track and to acknowledge each message) is the bottleneck for
#   short tasks, so several small workers drain faster than one big one (1.14x
#   to 1.22x on 2 cores; raw Celery gains the same with these settings).
#   Prefork (not solo) keeps task time limits and turns a crashed task process
#   into an immediate redelivery instead of a wait for the visibility timeout.
#   RabbitMQ or the embedded file broker: one prefork worker, --concurrency =
#   cores (on RabbitMQ, two small workers measured 0.93x to 1.16x of one: no
#   gain worth a second main process; solo workers stalled, see README).
# WORKER_POOL=asyncio: the framework's asyncio pool (app.core.background.pool),
#   for I/O-bound async tasks: up to CONCURRENCY (default 100) async bodies
#   await at once in each worker process, on one event loop. One process runs
#   on one core, so WORKERS processes (default: one per core) on every broker.
set -euo pipefail
cd "$(dirname "$0")/.."

broker="${CELERY_BROKER_URL:-}"
if [[ -z "$broker" && -f .env ]]; then
  broker="$(grep -E '^CELERY_BROKER_URL=' .env | tail -n 1 | cut -d= -f2- | tr -d '"'"'"'' || true)"
fi
cores="$(nproc)"
pool="${WORKER_POOL:-prefork}"
case "$pool" in
  prefork)
    celery=(.venv/bin/celery -A app.core.background.celery_app worker --pool prefork)
    concurrency_per_worker=1
    ;;
  asyncio)
    # Celery's hook for an out-of-tree pool: -P custom names the class in this variable.
    export CELERY_CUSTOM_WORKER_POOL=app.core.background.pool:AsyncioPool
    celery=(.venv/bin/celery -A app.core.background.celery_app worker --pool custom)
    concurrency_per_worker="${CONCURRENCY:-100}"
    ;;
  *)
    echo "WORKER_POOL must be prefork or asyncio, not '$pool'" >&2
    exit 2
    ;;
esac

several_workers=false
case "$broker" in
  redis://* | rediss://*) several_workers=true ;;
esac
if [[ "$pool" == asyncio ]]; then several_workers=true; fi

case "$several_workers" in
  true)
    workers="${WORKERS:-$cores}"
    for arg in "$@"; do
      case "$arg" in
        -n | -n* | --hostname | --hostname=*)
          echo "worker.sh names its workers worker1@%h, worker2@%h...: drop $arg" >&2
          exit 2
          ;;
      esac
    done
    pids=()
    # A warm shutdown of every worker on Ctrl-C or SIGTERM.
    trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
    for i in $(seq 1 "$workers"); do
      "${celery[@]}" --concurrency "$concurrency_per_worker" --hostname "worker${i}@%h" "$@" &
      pids+=("$!")
    done
    # Wait for every worker; a trapped signal interrupts `wait` (status > 128)
    # while the worker still runs: wait for it again. Exit with the first
    # failure, so that a supervisor sees workers that could not start.
    status=0
    for pid in "${pids[@]}"; do
      while true; do
        code=0
        wait "$pid" || code=$?
        if ((code > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
        break
      done
      if ((code != 0 && status == 0)); then status=$code; fi
    done
    exit "$status"
    ;;
  *)
    exec "${celery[@]}" --concurrency "${CONCURRENCY:-$cores}" "$@"
    ;;
esac
