#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite: lint, then pytest (GPU tests skip without a GPU).
#   ./test.sh                 # everything
#   ./test.sh tests/test_engine.py -k prefix   # pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh test
[ -n "${VIRTUAL_ENV:-}" ] || source .venv/bin/activate
ruff check .
exec python -m pytest -q -rs "$@"
