"""Orbax checkpoint dirs of params: atomic save, (sharded) restore, layout.

Every loader returns the same thing: the plain nested params tree of the
official Flax model (`embedder/...`, `layer_i/...`, `final_norm/...`), whatever
layout the checkpoint was written in (flat `transformer/...` keys of the
Kaggle releases, stacked layers, or a `transformer` sub-tree).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gemma_mt import sharding as sharding_lib
from gemma_mt.fs import atomic_dir

TOKENIZER_FILE = 'tokenizer.model'
# Beside the params of a dir we write: which architecture they are.
META_FILE = 'gemma_mt.json'
# Files that mark a directory as an orbax checkpoint (new and old formats).
_ORBAX_MARKERS = ('_CHECKPOINT_METADATA', '_METADATA', 'checkpoint',
                  'manifest.ocdbt')


class CheckpointError(ValueError):
  """A checkpoint directory is missing or not in a layout we can read."""


# ---------------------------------------------------------------- orbax I/O


def save_params(path: str | os.PathLike, params: Any,
                tokenizer: str | os.PathLike | bytes | None = None,
                overwrite: bool = False, meta: dict | None = None) -> Path:
  """Writes `params` as an orbax checkpoint dir at `path`, atomically.

  `tokenizer` (a tokenizer.model path or its bytes) is stored inside the dir
  as tokenizer.model and `meta` as gemma_mt.json, so one directory is a
  complete model. Everything is
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
    if meta is not None:
      write_meta(tmp, meta)
  return Path(path).expanduser().absolute()


def abstract_tree(tree: Any, shardings: Any, dtype: Any = None) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or shapes) carrying `shardings`.

  `shardings` is a tree matching `tree`, or one Sharding for every leaf.
  `dtype` casts floating leaves (e.g. restore float32 as bfloat16).
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def one(x, s):
    dt = x.dtype
    if dtype is not None and jnp.issubdtype(dt, jnp.floating):
      dt = dtype
    return jax.ShapeDtypeStruct(x.shape, dt, sharding=s)

  return jax.tree.map(one, tree, shardings)


def metadata_tree(path: Path) -> dict:
  """Shapes and dtypes of the tree saved at `path` (orbax metadata)."""
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  if tree is None:
    raise CheckpointError(f'{path}: orbax checkpoint has no item metadata')
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                      dict(tree))


def tree_mismatch(saved: Any, expected: Any) -> str | None:
  """The first difference in names or shapes between two trees of arrays
  (or ShapeDtypeStructs), in words; None when they match."""
  def flat(tree):
    return {jax.tree_util.keystr(k, simple=True, separator='/'): tuple(v.shape)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = flat(saved), flat(expected)
  if len(have) != len(want):
    return f'the checkpoint has {len(have)} arrays, {len(want)} expected'
  for name, shape in want.items():
    if name not in have:
      extra = sorted(set(have) - set(want))[0]
      return f'{name} expected, the checkpoint has {extra} instead'
    if have[name] != shape:
      return f'{name} is {have[name]} in the checkpoint, {shape} expected'
  return None


def restore_tree(path: str | os.PathLike, abstract: Any) -> Any:
  """Restores the tree at `path` into the layout of `abstract`
  (ShapeDtypeStructs with shardings, see `abstract_tree`), whatever mesh it
  was saved from: each device reads only its own shard."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(Path(path).expanduser().absolute(), abstract)


def load_params(path: str | os.PathLike, dtype: Any = None,
                sharding: Any = None) -> dict:
  """Restores the params of the orbax checkpoint dir `path` as jax arrays.

  dtype: cast every floating leaf to it while restoring (e.g. bfloat16).
  sharding: None (first device), one `jax.sharding.Sharding` for every leaf,
  a `Mesh` (FSDP-sharded as in training, each device reading only its
  shard), or a tree of shardings matching the returned params (applied
  after restore).
  """
  path = Path(path).expanduser().absolute()
  if not path.exists():
    raise FileNotFoundError(f'params checkpoint not found: {path}')
  if not is_orbax_dir(path):
    raise CheckpointError(f'{path}: not an orbax checkpoint directory '
                          f'(none of {", ".join(_ORBAX_MARKERS)} in it)')
  shapes = metadata_tree(path)
  if isinstance(sharding, jax.sharding.Mesh):
    leaf = sharding_lib.param_shardings(shapes, sharding)
  elif isinstance(sharding, jax.sharding.Sharding):
    leaf = sharding
  else:
    leaf = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = normalize_layout(restore_tree(path, abstract_tree(shapes, leaf,
                                                             dtype)))
  if sharding is not None and not isinstance(
      sharding, (jax.sharding.Sharding, jax.sharding.Mesh)):
    params = jax.device_put(params, sharding)
  return params


def write_meta(path: Path, meta: dict) -> None:
  (Path(path) / META_FILE).write_text(json.dumps(meta) + '\n')


def read_meta(path: Path) -> dict | None:
  """The dir's `gemma_mt.json`, or None if it has none."""
  f = Path(path) / META_FILE
  if not f.is_file():
    return None
  try:
    meta = json.loads(f.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{f}: not valid JSON ({e})') from None
  if not isinstance(meta, dict):
    raise CheckpointError(f'{f}: expected a JSON object')
  return meta


def is_orbax_dir(path: Path) -> bool:
  return path.is_dir() and any((path / m).exists() for m in _ORBAX_MARKERS)


# ------------------------------------------------------ layout normalization


def normalize_layout(tree: dict) -> dict:
  """Any official checkpoint layout -> the nested `model.init` params tree.

  Handles the flat `{'transformer/layer_0/attn/q_einsum': {'w': ..}}` layout
  of the Kaggle releases, its `stacked_layers/attention_type_j` variant, a
  `{'transformer': {...}}` or `{'params': {...}}` wrapper, and MLP weights
  wrapped as `{'w': ...}`. Media towers stay: `weights.text_decoder` drops
  them, the one place that does.
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
