#!/usr/bin/env bash
# Create .venv from uv.lock (reproducible, ~20 s with a warm cache). Python >= 3.12 is required by
# Google's gemma library (the test reference); we look for it on PATH and in pyenv.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null 2>&1 || python3 -m pip install -q "uv>=0.5"
UV="$(command -v uv || echo "$(python3 -m site --user-base)/bin/uv")"
PY="${GEMMA_MT_PYTHON:-}"
if [ -z "$PY" ]; then
  # pyenv shims exist on PATH even when that version is not selected, so each candidate must run.
  for c in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3.12 "$HOME"/.pyenv/versions/3.13*/bin/python3.13 python3.13; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1; then
      PY="$(command -v "$c")"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "error: need Python >= 3.12 (set GEMMA_MT_PYTHON=/path/to/python3.12)" >&2; exit 1; }
"$UV" sync --frozen --python "$PY" "$@"
