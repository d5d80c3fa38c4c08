#!/usr/bin/env bash
# Run every benchmark and write bench/RESULTS.md: bench/run.sh [--only db --rounds 5 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m bench "$@"
