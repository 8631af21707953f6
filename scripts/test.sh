#!/usr/bin/env bash
# The test command: set up .venv from the lock file and the interop clients (.venv-hf, .venv-llama),
# then run the whole suite on the CPU, over 2 workers (PYTEST_WORKERS; 0 runs it in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
./scripts/setup_interop_env.sh
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
