"""Where gemma_mt keeps what it builds once: the converted embedded model,
its tokenizer, compiled executables. One home, light to import."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = 'GEMMA_MT_CACHE'


def cache_home() -> Path:
  """$GEMMA_MT_CACHE, else ~/.cache/gemma_mt (not created)."""
  return Path(os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'gemma_mt'
              ).expanduser()
