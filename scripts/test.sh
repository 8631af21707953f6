#!/usr/bin/env bash
# The test command: set up .venv from the lock file, then run the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q "$@"
