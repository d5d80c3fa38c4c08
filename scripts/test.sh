#!/usr/bin/env bash
# Install everything, then run the whole test suite (real Redis, PostgreSQL,
# RabbitMQ and worker processes; tests whose service is missing are skipped,
# or fail when REQUIRE_SERVICES=1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
