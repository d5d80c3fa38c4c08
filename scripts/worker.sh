#!/usr/bin/env bash
# Start the workers the way bench/RESULTS.md found fastest with the same guarantees.
#
#   scripts/worker.sh [any celery worker option, e.g. -Q high_priority,default]
#
# Redis or RabbitMQ broker: WORKERS worker processes (default: one per core),
#   each --pool prefork --concurrency 1. The worker's main process (consuming,
#   tracking and acknowledging each message) is the bottleneck for short tasks,
#   so several small workers drain faster than one big one (measured on 2
#   cores: 1.14x on Redis, 1.16x on RabbitMQ). Prefork (not solo) keeps task
#   time limits and turns a crashed task process into an immediate redelivery
#   instead of a wait for the visibility timeout; on RabbitMQ, solo workers
#   also stalled in the benchmark (see README).
# The embedded file broker: one prefork worker, --concurrency = cores.
set -euo pipefail
cd "$(dirname "$0")/.."

broker="${CELERY_BROKER_URL:-}"
if [[ -z "$broker" && -f .env ]]; then
  broker="$(grep -E '^CELERY_BROKER_URL=' .env | tail -n 1 | cut -d= -f2- | tr -d '"'"'"'' || true)"
fi
cores="$(nproc)"
celery=(.venv/bin/celery -A app.core.background.celery_app worker --pool prefork)

case "$broker" in
  redis://* | rediss://* | amqp://* | amqps://* | pyamqp://*)
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
