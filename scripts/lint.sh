#!/usr/bin/env bash
# ruff (lint and format check) and mypy (strict on app/core/background).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
