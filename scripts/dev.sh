#!/usr/bin/env bash
# Install everything, then run the API and one worker on the embedded default
# (SQLite + file broker under ./.data, no server needed). Ctrl-C (or a TERM to
# this script) stops both. If either one exits, the other is stopped and the
# script exits non-zero. Arguments go to the worker (scripts/dev.sh -Q high_priority).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
mkdir -p .data
# Seconds each process gets to shut down warm before it is killed.
STOP_TIMEOUT="${DEV_STOP_TIMEOUT:-10}"

pids=()
stop() {
  trap - INT TERM
  local pid alive
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq $((STOP_TIMEOUT * 10))); do
    alive=0
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
# Both run in the background so that bash handles a signal at once: a trap
# does not run while bash waits for a foreground child, only during `wait`.
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM

.venv/bin/celery -A app.core.background.celery_app worker --loglevel INFO --concurrency 2 "$@" &
worker=$!
pids+=("$worker")
.venv/bin/uvicorn app.main:app --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" &
api=$!
pids+=("$api")

# Returns when the first of the two exits (a broken tasks.py stops the worker
# at start; a taken port stops uvicorn).
set +e
wait -n "$worker" "$api"
code=$?
set -e
if kill -0 "$worker" 2>/dev/null; then
  echo "dev.sh: the API exited (code $code); stopping the worker" >&2
else
  echo "dev.sh: the worker exited (code $code), see its error above; stopping the API" >&2
fi
stop
exit $((code == 0 ? 1 : code))
