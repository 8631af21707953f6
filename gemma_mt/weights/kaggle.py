"""Official Flax checkpoints from Kaggle, through `kagglehub` (needs an account)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemma_mt.weights import orbax_io


def load_kaggle(handle: str, dtype: Any = None,
                sharding: Any = None) -> tuple[dict, Path | None]:
  """Downloads (or reuses kagglehub's cache for) an official Flax checkpoint.

  `handle` is e.g. 'google/gemma/flax/2b-it', 'google/gemma-2/flax/
  gemma2-2b-it' or 'google/gemma-3/flax/gemma3-270m' (optionally '/<ver>').
  Offline, an unversioned handle falls back to the newest complete version
  already in kagglehub's cache. Returns (params, tokenizer.model path).
  """
  import kagglehub  # Lazy: only this path needs it.

  try:
    path = kagglehub.model_download(handle)
  except Exception as e:  # kagglehub raises requests/HTTP/auth errors.
    path = _cached_version(handle)
    if path is None:
      raise RuntimeError(
          f'Could not download {handle!r} from Kaggle '
          f'({type(e).__name__}: {e}).\nTo fix: set KAGGLE_USERNAME and '
          'KAGGLE_KEY (or run `kagglehub.login()`), accept the Gemma license '
          'for this model on kaggle.com (https://www.kaggle.com/models/'
          f'{"/".join(handle.split("/")[:2])}), and check network access; or '
          'download the checkpoint elsewhere and pass its local directory '
          'with --checkpoint.') from e
  return orbax_io.load_checkpoint_dir(path, dtype=dtype, sharding=sharding)


def _cached_version(handle: str) -> Path | None:
  """Newest fully downloaded version of an unversioned handle, if any."""
  from kagglehub import config

  parts = handle.strip('/').split('/')
  if len(parts) != 4:
    return None  # Versioned (or malformed): kagglehub already looked.
  base = Path(config.get_cache_folder(), 'models', *parts)
  versions = [int(p.name) for p in base.glob('*') if p.name.isdigit()
              and p.is_dir() and (base / f'{p.name}.complete').exists()]
  return base / str(max(versions)) if versions else None
