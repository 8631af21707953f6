#!/usr/bin/env bash
# The test command: set up .venv from the lock file and the interop clients (.venv-hf, .venv-llama),
# then run the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup_env.sh
./scripts/setup_interop_env.sh
export JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q "$@"
