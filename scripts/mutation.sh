#!/usr/bin/env bash
# Mutation testing of the safety-critical modules (cosmic-ray): see scripts/mutation.py.
# Not part of CI (it takes a long time). Arguments go to scripts/mutation.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if ! .venv/bin/python -c "import cosmic_ray" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet -e ".[mutation]"
fi
exec .venv/bin/python scripts/mutation.py "$@"
