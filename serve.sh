#!/usr/bin/env bash
# Set up (first run only) and start the server. With no --model it serves the built-in demo model.
#   ./serve.sh                                   # demo model on CPU, http://127.0.0.1:8000/v1
#   ./serve.sh --model Qwen/Qwen3-Coder-30B-A3B-Instruct
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
[ -n "${VIRTUAL_ENV:-}" ] || source .venv/bin/activate
exec qwenserve serve "$@"
