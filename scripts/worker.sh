#!/usr/bin/env bash
# Start the workers the way bench/RESULTS.md found fastest with the same guarantees.
#
#   scripts/worker.sh [any celery worker option, e.g. -Q high_priority,default]
#
# Redis broker: WORKERS worker processes (default: one per core), each
#   --pool prefork --concurrency 1. On Redis the worker's main process (BRPOP,
#   then MULTI/EXEC to track and acknowledge each message) is the bottleneck, so
#   several small workers drain much faster than one big one. Prefork (not solo)
#   keeps task time limits and turns a crashed task process into an immediate
#   redelivery instead of a wait for the visibility timeout.
# RabbitMQ or the embedded broker: one prefork worker, --concurrency = cores.
set -euo pipefail
cd "$(dirname "$0")/.."

broker="${CELERY_BROKER_URL:-}"
if [[ -z "$broker" && -f .env ]]; then
  broker="$(grep -E '^CELERY_BROKER_URL=' .env | tail -n 1 | cut -d= -f2- | tr -d '"'"'"'' || true)"
fi
cores="$(nproc)"
celery=(.venv/bin/celery -A app.core.background.celery_app worker --pool prefork)

case "$broker" in
  redis://* | rediss://*)
    workers="${WORKERS:-$cores}"
    pids=()
    # A warm shutdown of every worker on Ctrl-C or SIGTERM.
    trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
    for i in $(seq 1 "$workers"); do
      "${celery[@]}" --concurrency 1 --hostname "worker${i}@%h" "$@" &
      pids+=("$!")
    done
    # A signal interrupts `wait`: wait again until every worker has shut down.
    until wait; do :; done
    ;;
  *)
    exec "${celery[@]}" --concurrency "${CONCURRENCY:-$cores}" "$@"
    ;;
esac
