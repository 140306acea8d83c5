#!/usr/bin/env bash
# Install qwenserve and its dependencies into ./.venv (or the active virtualenv), once.
# Usage: scripts/setup.sh [test]   -- "test" adds the test tools (pytest, openai SDK, ruff, node).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
PY=python
stamp=".venv-installed${extras:+-$extras}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && $PY -c "import qwenserve, torch" 2>/dev/null; then
  exit 0
fi

$PY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install torch                       # CUDA build from PyPI
  else
    # A CPU build: the local one if this machine has it, else PyTorch's CPU index, else PyPI's default.
    $PY -m pip install "torch==2.13.0" 2>/dev/null \
      || $PY -m pip install torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || $PY -m pip install torch
  fi
fi
if [ "$extras" = "test" ]; then
  $PY -m pip install -q -e ".[test]"
else
  $PY -m pip install -q -e .
fi
touch "$stamp"
