"""Shared fixtures: the embedded tokenizer and the offline MTNT copy."""

from pathlib import Path

import pytest

# CI clones the repo with shared/ beside it, as on the dev machines.
SHARED = Path(__file__).resolve().parents[1].parent / 'shared'


@pytest.fixture(scope='session')
def tokenizer():
  """Gemma 3 tokenizer rebuilt from the embedded GGUF (cached on disk after the first run)."""
  from gemma_mt.weights.embedded import default_tokenizer

  return default_tokenizer()


@pytest.fixture(scope='session')
def mtnt_dir() -> Path:
  path = SHARED / 'data' / 'mtnt'
  if not path.is_dir():
    pytest.skip(f'offline MTNT copy not found at {path}')
  return path


@pytest.fixture
def default_sigint():
  """SIGINT raising KeyboardInterrupt, as in a command started from a shell
  (pytest-xdist's workers ignore SIGINT)."""
  import signal
  old = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, old)
