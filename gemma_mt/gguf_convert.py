"""Gemma 3 GGUF (llama.cpp) -> official Flax parameter tree, as numpy.

The embedded default model ships as a Q4_K_M GGUF (see
shared/notes/gguf-gemma3-270m.md); this dequantizes it into the exact tree of
`gemma.gm.nn.Gemma3_*` so every other module only ever sees official params.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

# The dims of google/gemma-3-270m, as GGUF metadata fields (without the
# `gemma3.` prefix) -> value. Used to reject a GGUF of another size early.
GEMMA3_270M_FIELDS: dict[str, int] = {
  "block_count": 18,
  "embedding_length": 640,
  "feed_forward_length": 2048,
  "attention.head_count": 4,
  "attention.head_count_kv": 1,
  "attention.key_length": 256,
}
GEMMA3_270M_VOCAB = 262_144

# Dequantize big tensors this many rows at a time, so the float32 temporaries
# of `gguf.quants.dequantize` stay small next to the output array.
_ROWS_PER_CHUNK = 16_384

_NORMS = {  # GGUF block tensor -> official layer sub-module (stored as 1 + w).
  "attn_norm": "pre_attention_norm",
  "post_attention_norm": "post_attention_norm",
  "ffn_norm": "pre_ffw_norm",
  "post_ffw_norm": "post_ffw_norm",
}


class GGUFError(ValueError):
  """The GGUF file is not a Gemma 3 checkpoint of the expected shape."""


def read_metadata(reader: Any, path: str | os.PathLike) -> dict[str, Any]:
  """Returns the architecture + dims, raising a GGUFError naming the field."""
  def field(name: str) -> Any:
    f = reader.get_field(name)
    if f is None:
      raise GGUFError(f"{path}: GGUF metadata field {name!r} is missing")
    return f.contents()

  arch = field("general.architecture")
  if arch != "gemma3":
    raise GGUFError(
      f"{path}: GGUF metadata field 'general.architecture' is {arch!r}, "
      "expected 'gemma3'"
    )
  meta = {k: int(field(f"gemma3.{k}")) for k in GEMMA3_270M_FIELDS}
  meta["architecture"] = arch
  return meta


def check_metadata(
  meta: Mapping[str, Any], expect: Mapping[str, int], path: str | os.PathLike
) -> None:
  """Raises a GGUFError naming the first field that differs from `expect`."""
  for key, want in expect.items():
    if meta.get(key) != want:
      raise GGUFError(
        f"{path}: GGUF metadata field 'gemma3.{key}' is "
        f"{meta.get(key)!r}, expected {want!r}"
      )


def params_from_gguf(
  path: str | os.PathLike,
  dtype: Any = np.float32,
  expect: Mapping[str, int] | None = None,
) -> dict:
  """Converts a gemma3 GGUF into the official nested params dict (numpy).

  Tensors are dequantized one at a time (big ones in row chunks) straight
  into `dtype`, so peak memory is about the output size plus one chunk.
  `expect` (e.g. GEMMA3_270M_FIELDS) pins the dims; without it any gemma3
  size is accepted.
  """
  import gguf  # Imported here: only the conversion needs it.

  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  dtype = np.dtype(dtype)
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # Corrupt / not a GGUF at all.
    raise GGUFError(f"{path}: not a readable GGUF file ({e})") from e
  meta = read_metadata(reader, path)
  if expect:
    check_metadata(meta, expect, path)
  tensors = {t.name.removesuffix(".weight"): t for t in reader.tensors}

  n_layers = meta["block_count"]
  d = meta["embedding_length"]
  hidden = meta["feed_forward_length"]
  n_heads = meta["attention.head_count"]
  n_kv = meta["attention.head_count_kv"]
  head_dim = meta["attention.key_length"]

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantized tensor `name` in numpy order, checked against shape."""
    t = tensors.get(name)
    if t is None:
      raise GGUFError(f"{path}: tensor {name!r} is missing")
    got = tuple(int(s) for s in reversed(t.shape))
    if got != shape:
      raise GGUFError(
        f"{path}: tensor {name!r} has shape {got}, expected {shape}"
      )
    out = np.empty(shape, dtype)
    rows = out.reshape(-1, shape[-1])
    data = t.data.reshape(rows.shape[0], -1)
    for i in range(0, rows.shape[0], _ROWS_PER_CHUNK):
      chunk = gguf.quants.dequantize(
        data[i : i + _ROWS_PER_CHUNK], t.tensor_type
      )
      rows[i : i + _ROWS_PER_CHUNK] = chunk.reshape(-1, shape[-1])
    return out

  def norm(name: str, size: int) -> dict:
    # llama.cpp stores Gemma's RMSNorm weight as 1 + w; Flax wants w.
    return {"scale": (get(name, (size,)).astype(np.float32) - 1).astype(dtype)}

  vocab = tensors["token_embd"].shape[1] if "token_embd" in tensors else 0
  params: dict = {
    "embedder": {"input_embedding": get("token_embd", (int(vocab), d))},
    "final_norm": norm("output_norm", d),
  }
  for i in range(n_layers):
    b = f"blk.{i}."
    q = get(b + "attn_q", (n_heads * head_dim, d))
    q = q.reshape(n_heads, head_dim, d).transpose(0, 2, 1)
    k, v = (
      get(b + n, (n_kv * head_dim, d))
      .reshape(n_kv, head_dim, d)
      .transpose(0, 2, 1)
      for n in ("attn_k", "attn_v")
    )
    o = get(b + "attn_output", (d, n_heads * head_dim))
    o = o.reshape(d, n_heads, head_dim).transpose(1, 2, 0)
    attn = {
      "attn_vec_einsum": {"w": np.ascontiguousarray(o)},
      "_query_norm": norm(b + "attn_q_norm", head_dim),
      "_key_norm": norm(b + "attn_k_norm", head_dim),
    }
    if n_heads == n_kv:  # The official module fuses q, k, v then.
      attn["qkv_einsum"] = {"w": np.stack([q, k, v])}
    else:
      attn["q_einsum"] = {"w": np.ascontiguousarray(q)}
      attn["kv_einsum"] = {"w": np.stack([k, v])}
    del q, k, v, o
    layer = {
      "attn": attn,
      "mlp": {
        "gating_einsum": np.stack(
          [get(b + "ffn_gate", (hidden, d)), get(b + "ffn_up", (hidden, d))]
        ),
        "linear": np.ascontiguousarray(get(b + "ffn_down", (d, hidden)).T),
      },
    }
    for gguf_name, flax_name in _NORMS.items():
      layer[flax_name] = norm(b + gguf_name, d)
    params[f"layer_{i}"] = layer
  return params
