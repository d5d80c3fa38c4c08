#!/usr/bin/env bash
# Install everything, then run the API and one worker on the embedded default
# (SQLite + file broker under ./.data, no server needed). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
mkdir -p .data
.venv/bin/celery -A app.core.background.celery_app worker --loglevel INFO --concurrency 2 &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null' EXIT INT TERM
.venv/bin/uvicorn app.main:app --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
