#!/usr/bin/env bash
# ruff (lint and format check), mypy (strict on app/core) and the import layers (import-linter).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
