"""What the Gemma decoder families (`gemma`: Gemma 1-3, `gemma4`) share:
layer types, attention masks, positions, rotary embeddings, the einsum
weight, the attention core and its cache write, the KV cache layout and the
tied LM head. A family module holds only what makes it differ."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

GLOBAL = 'global'
LOCAL = 'local'
NEG_INF = -2.3819763e38  # The mask value of the official implementation.


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


# --- Shared modules and the attention core ----------------------------------
class Einsum(nn.Module):
  """A weight `w` of a given shape, applied with an einsum equation
  (`w_scale`: a constant the weight is multiplied by where it is used)."""

  shape: tuple[int, ...]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  w_scale: float | None = None

  @nn.compact
  def __call__(self, eqn: str, x: Array) -> Array:
    w = self.param('w', nn.initializers.normal(), self.shape, self.param_dtype)
    w = w.astype(self.dtype)
    if self.w_scale is not None:
      w = w * self.w_scale
    return jnp.einsum(eqn, x, w)


def write_at(buf: Array, new: Array, end_index: Array) -> Array:
  """new [B, T, ...] written into buf [B, S, ...] from slot `end_index`:
  one slot for every row (a scalar), or each row's own (`end_index` [B],
  T == 1), so that rows of a continuous batch keep their tokens from slot 0
  and attend to those only."""
  new = new.astype(buf.dtype)
  if jnp.ndim(end_index) == 0:
    start = (0, end_index) + (0,) * (buf.ndim - 2)
    return jax.lax.dynamic_update_slice(buf, new, start)
  if new.shape[1] != 1:
    raise ValueError(f'per-row cache writes take one token, got {new.shape[1]}')
  return buf.at[jnp.arange(buf.shape[0]), end_index].set(new[:, 0])


def write_cache(cache: dict, k: Array, v: Array, end_index: Array,
                dtype: Any) -> tuple[Array, Array, dict]:
  """New keys/values written into a layer's cache at `end_index` (as
  `write_at`): (all keys, all values, in `dtype`; the layer's new cache)."""
  k = write_at(cache['k'], k, end_index)
  v = write_at(cache['v'], v, end_index)
  return k.astype(dtype), v.astype(dtype), {'k': k, 'v': v}


CUDNN_MAX_HEAD_DIM = 256


def attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float,
              soft_cap: float | None = None, impl: str = 'einsum',
              kv_len: Array | None = None, decode_kernel: bool = False) -> Array:
  """Attention of queries q [B, T, N, H] (unscaled) over k, v [B, S, K, H].

  `kv_len` is given when attending over a KV cache (its valid slots). The
  kernel follows from the call: one new token over a cache with
  `decode_kernel` runs the Pallas kernel (`decode_attention`); a no-cache
  call with `impl` 'jax' or 'cudnn' (and no soft-cap) runs
  `jax.nn.dot_product_attention`; everything else the einsum reference.
  """
  if decode_kernel and kv_len is not None and q.shape[1] == 1:
    from gemma_mt.models.decode_attention import decode_attention
    return decode_attention(q * scale, k, v, mask, kv_len, soft_cap)
  if impl != 'einsum' and kv_len is None and soft_cap is None:
    # cuDNN's flash attention takes head_dim <= 256 in multiples of 8; wider
    # heads (Gemma 4's global layers: 512) run XLA's fused attention instead.
    cudnn = impl == 'cudnn' and q.shape[-1] <= CUDNN_MAX_HEAD_DIM and not q.shape[-1] % 8
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=scale,
        implementation='cudnn' if cudnn else None)
  return attention_einsum(q * scale, k, v, mask, soft_cap)


def attention_einsum(q: Array, k: Array, v: Array, mask: Array,
                     soft_cap: float | None) -> Array:
  """Plain attention of scaled queries; float32 logits and softmax, GQA by
  head groups, masked keys at the official mask value."""
  B, T, N, H = q.shape
  K = k.shape[2]
  q = q.reshape(B, T, K, N // K, H)
  logits = jnp.einsum('BTKGH,BSKH->BTKGS', q, k,
                      preferred_element_type=jnp.float32)
  if soft_cap is not None:
    logits = jnp.tanh(logits / soft_cap) * soft_cap
  logits = jnp.where(mask[:, :, None, None, :], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  encoded = jnp.einsum('BTKGS,BSKH->BTKGH', probs, v)
  return encoded.reshape(B, T, N, H)


def empty_cache(layer_shapes: dict[int, tuple[int, int]], batch_size: int,
                cache_len: int, dtype: Any) -> dict:
  """An empty KV cache: `layer_<i>` {'k', 'v'} [B, S, kv heads, key size]
  for each layer i that owns keys/values, `end_index` (the next slot to
  write: a scalar, or one per row [B]) and `positions` [B, S]."""
  cache: dict = {}
  for i, (K, H) in layer_shapes.items():
    shape = (batch_size, cache_len, K, H)
    cache[f'layer_{i}'] = {'k': jnp.zeros(shape, dtype),
                           'v': jnp.zeros(shape, dtype)}
  cache['end_index'] = jnp.zeros((), jnp.int32)
  cache['positions'] = jnp.zeros((batch_size, cache_len), jnp.int32)
  return cache


class TiedHead:
  """The decoders' `logits` method: hidden [..., D] -> logits [..., V]
  through the tied embedding, so a decode loop asks the model for logits
  (`model.apply(variables, hidden, method='logits')`) and never reads the
  parameter tree itself."""

  def logits(self, hidden: Array) -> Array:
    return self.logits_of(self.variables['params']['embedder']['input_embedding'],
                          hidden)

  def logits_of(self, table: Array, hidden: Array) -> Array:
    return logits_from_hidden(table, hidden, self.config.final_logit_softcap)


def param_shapes(module: nn.Module) -> Any:
  """The params tree of a decoder module as ShapeDtypeStructs (traced, not
  compiled)."""
  def init():  # Inputs made inside: nothing concrete, so nothing compiled.
    x = jnp.zeros((1, 1), jnp.int32)
    return module.init(jax.random.key(0), x, x, jnp.ones((1, 1, 1), bool))
  return jax.eval_shape(init)['params']
