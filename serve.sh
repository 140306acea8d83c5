#!/usr/bin/env bash
# Set up (first run only) and start the server. With no --model it serves the built-in demo model.
#   ./serve.sh                                   # demo model on CPU, http://127.0.0.1:8000/v1
#   ./serve.sh --model Qwen/Qwen3-Coder-30B-A3B-Instruct
# Runs where it is called from, so a relative --model path means what it says.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
"$ROOT/scripts/setup.sh"
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || source "$ROOT/.venv/bin/activate"
exec qwenserve serve "$@"
