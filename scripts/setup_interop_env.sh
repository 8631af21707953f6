#!/usr/bin/env bash
# Client environments for the interop tests (tests/weights/test_interop.py): what a user of our exports runs.
#   .venv-hf     Python 3.11 + PyTorch (CPU) + transformers + peft: loads our HF / PEFT exports.
#   .venv-llama  Python 3.12 + llama.cpp (the llama-cpp-cffi wheel's CPU library): runs our GGUF exports.
# Kept out of .venv: they are heavy and their pins (torch, transformers<->TensorFlow) do not mix
# with the gemma reference library. Each is rebuilt only when its requirements file changes.
set -euo pipefail
cd "$(dirname "$0")/.."
REQ=tests/support/interop
UV="$(command -v uv || echo "$(python3 -m site --user-base)/bin/uv")"

stamp_ok() { [ -f "$1/.req" ] && cmp -s "$1/.req" "$2"; }

# PyTorch 2.13.0's CPU wheel lies on this machine kind's disk for Python 3.11 (pip finds it); elsewhere pip
# downloads it. uv does not look there, hence pip.
if ! stamp_ok .venv-hf $REQ/requirements-hf.txt; then
  rm -rf .venv-hf
  PY311="$(command -v python3.11 || ls "$HOME"/.pyenv/versions/3.11*/bin/python3.11 | head -1)"
  "$PY311" -m venv .venv-hf
  .venv-hf/bin/python -m pip install -q --disable-pip-version-check -r $REQ/requirements-hf.txt
  cp $REQ/requirements-hf.txt .venv-hf/.req
fi

# llama-cpp-cffi ships llama.cpp prebuilt; we load only its CPU library through cffi (its Python layer
# pins transformers<5 and friends, so --no-deps). The library wants one libstdc++ symbol newer than
# Debian 12's (__cxa_call_terminate, GCC 13), which tests/support/interop/cxa_shim.cc supplies.
if ! stamp_ok .venv-llama $REQ/requirements-llama.txt; then
  rm -rf .venv-llama
  PY312="$(ls "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1 || command -v python3.12)"
  "$UV" venv -q -p "$PY312" .venv-llama
  VIRTUAL_ENV="$PWD/.venv-llama" "$UV" pip install -q --no-deps -r $REQ/requirements-llama.txt
  g++ -shared -fPIC -O2 -o .venv-llama/libcxa_shim.so $REQ/cxa_shim.cc
  cp $REQ/requirements-llama.txt .venv-llama/.req
fi
