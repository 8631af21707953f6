"""What the Gemma decoder families (`model`: Gemma 1-3, `gemma4`) share:
layer types, attention masks, positions, rotary embeddings, the tied LM
head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

GLOBAL = 'global'
LOCAL = 'local'
_NEG_INF = -2.3819763e38  # The mask value of the official implementation.


# --- Masks and positions -----------------------------------------------------
def positions_from_mask(input_mask: Array) -> Array:
  """Positions 0, 1, ... over the real tokens of each row (pads repeat)."""
  return jnp.maximum(jnp.cumsum(input_mask, axis=-1) - 1, 0).astype(jnp.int32)


def causal_mask(input_mask: Array) -> Array:
  """[B, L, L]: query i sees real key j <= i."""
  L = input_mask.shape[-1]
  causal = jnp.tril(jnp.ones((L, L), dtype=jnp.bool_))
  return causal[None] & input_mask[:, None, :].astype(jnp.bool_)


def segment_causal_mask(segment_ids: Array) -> Array:
  """[B, L, L] for packed rows: causal and within the same segment (0 = pad)."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return causal_mask(segment_ids != 0) & same


def sliding_mask(q_pos: Array, k_pos: Array, window: int) -> Array:
  """[B, T, S]: keys less than `window` positions away (official semantics)."""
  q, k = q_pos[:, :, None], k_pos[:, None, :]
  return (k > q - window) & (k < q + window)


def apply_rope(x: Array, positions: Array, base: float,
               scale: float = 1.0, proportion: float = 1.0) -> Array:
  """Rotary embedding, half-split layout, as in the official implementation;
  on the first `proportion` of each half (Gemma 4's global layers: the other
  angles are 0, those dims pass through)."""
  head_dim = x.shape[-1]
  rope = int(proportion * head_dim // 2)
  exponents = 2.0 * jnp.arange(rope, dtype=jnp.float32) / head_dim
  timescale = jnp.pad(base**exponents, (0, head_dim // 2 - rope),
                      constant_values=jnp.inf)
  angles = positions[..., None].astype(jnp.float32) / timescale / scale
  angles = angles[..., None, :]  # [B, T, 1, H/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def logits_from_hidden(table: Array, x: Array,
                       softcap: float | None) -> Array:
  """Tied LM head: hidden [..., D] -> logits [..., V], with the soft-cap."""
  logits = jnp.einsum('...D,VD->...V', x, table.astype(x.dtype),
                      preferred_element_type=jnp.float32)
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  return logits
